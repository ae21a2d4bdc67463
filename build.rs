//! Passes the location of the nginx build that `nginx-sys` used to the integration tests, so
//! they run the very nginx binary the module was compiled against, and the features of that
//! nginx (`--with-http_ssl_module` and the like) to the module as `ngx_feature` cfgs, whether
//! that nginx chains same-name headers (1.23.0 on) as `ngx_header_chain`; and a
//! hash of the sources that lay out the shared zone (`core/src`, `src/zone.rs`) as
//! `MARTD_ZONE_SOURCES`, part of the zone's layout id.
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// FNV-1a over the names and contents of the files that define the zone's layout.
fn zone_sources_hash() -> u64 {
    let mut files = Vec::new();
    rust_files(Path::new("core/src"), &mut files);
    files.push(PathBuf::from("src/zone.rs"));
    files.sort();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for f in &files {
        let bytes = std::fs::read(f).unwrap_or_default();
        for b in f.to_string_lossy().as_bytes().iter().chain(&bytes) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn main() {
    println!("cargo::rerun-if-changed=core/src");
    println!("cargo::rerun-if-changed=src/zone.rs");
    println!("cargo::rustc-env=MARTD_ZONE_SOURCES={:016x}", zone_sources_hash());
    println!("cargo::rerun-if-env-changed=DEP_NGINX_BUILD_DIR");
    if let Ok(dir) = std::env::var("DEP_NGINX_BUILD_DIR") {
        println!("cargo::rustc-env=MARTD_NGINX_BUILD_DIR={dir}");
    }
    // nginx 1.23.0 chains headers of the same name (`ngx_table_elt_t.next`).
    println!("cargo::rerun-if-env-changed=DEP_NGINX_VERSION_NUMBER");
    println!("cargo::rustc-check-cfg=cfg(ngx_header_chain)");
    let version: u64 = std::env::var("DEP_NGINX_VERSION_NUMBER")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    if version >= 1_023_000 {
        println!("cargo::rustc-cfg=ngx_header_chain");
    }
    println!("cargo::rerun-if-env-changed=DEP_NGINX_FEATURES");
    println!("cargo::rustc-check-cfg=cfg(ngx_feature, values(any()))");
    if let Ok(features) = std::env::var("DEP_NGINX_FEATURES") {
        for f in features.split(',').filter(|f| !f.is_empty()) {
            println!("cargo::rustc-cfg=ngx_feature=\"{f}\"");
        }
    }
}
