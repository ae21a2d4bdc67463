//! Passes the location of the nginx build that `nginx-sys` used to the integration tests, so
//! they run the very nginx binary the module was compiled against, and the features of that
//! nginx (`--with-http_ssl_module` and the like) to the module as `ngx_feature` cfgs.
fn main() {
    println!("cargo::rerun-if-env-changed=DEP_NGINX_BUILD_DIR");
    if let Ok(dir) = std::env::var("DEP_NGINX_BUILD_DIR") {
        println!("cargo::rustc-env=MARTD_NGINX_BUILD_DIR={dir}");
    }
    println!("cargo::rerun-if-env-changed=DEP_NGINX_FEATURES");
    println!("cargo::rustc-check-cfg=cfg(ngx_feature, values(any()))");
    if let Ok(features) = std::env::var("DEP_NGINX_FEATURES") {
        for f in features.split(',').filter(|f| !f.is_empty()) {
            println!("cargo::rustc-cfg=ngx_feature=\"{f}\"");
        }
    }
}
