//! Passes the location of the nginx build that `nginx-sys` used to the integration tests, so
//! they run the very nginx binary the module was compiled against.
fn main() {
    println!("cargo::rerun-if-env-changed=DEP_NGINX_BUILD_DIR");
    if let Ok(dir) = std::env::var("DEP_NGINX_BUILD_DIR") {
        println!("cargo::rustc-env=MARTD_NGINX_BUILD_DIR={dir}");
    }
}
