# martd in Debian's nginx:
#
#   docker build -t martd . && docker run -p 8080:8080 martd
#
# then http://localhost:8080/ is the demo page and /sub?channel=NAME the listener endpoint;
# /pub (publishing) answers only requests from inside the container (127.0.0.1), e.g.
#   docker exec CONTAINER curl -s -d hello 'http://127.0.0.1:8080/pub?channel=demo'
# Your own configuration: -v /path/to/your.conf:/etc/nginx/martd.conf:ro (the module is loaded
# by the command line, not by the file). Tested with buildah: scripts/container-test.

# --- build: the module, compiled against Debian's own nginx source (nginx-dev) configured with
# the flags Debian's nginx binary was built with, so that Debian's nginx package loads it.
FROM debian:trixie-slim AS build
SHELL ["/bin/bash", "-euo", "pipefail", "-c"]
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        cargo rustc libclang-dev gcc libc6-dev make nginx-dev \
        libpcre2-dev libssl-dev zlib1g-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# Only ./configure runs (it writes objs/ngx_auto_config.h and objs/Makefile, which the Rust
# bindings are generated from); nginx itself is not built.
RUN mkdir /build \
 && cp -a /usr/share/nginx/src /build/nginx \
 && . /build/nginx/conf_flags \
 && cd /build/nginx \
 && ./configure "${NGX_CONF_FLAGS[@]}" >/build/nginx-configure.log
WORKDIR /build/martd
COPY . .
RUN NGINX_SOURCE_DIR=/build/nginx NGINX_BUILD_DIR=/build/nginx/objs \
        cargo build --release --locked --no-default-features --features export-modules -p martd \
 && install -m 644 target/release/libngx_http_martd_module.so /build/ngx_http_martd_module.so \
 && strip --strip-unneeded /build/ngx_http_martd_module.so

# --- runtime: Debian's nginx package plus the module; no compilers.
FROM debian:trixie-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx curl \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/martd/logs \
 && ln -sf /dev/stdout /var/lib/martd/logs/access.log
COPY --from=build /build/ngx_http_martd_module.so /usr/lib/nginx/modules/ngx_http_martd_module.so
COPY pkg/deb/mod-http-martd.conf /usr/share/nginx/modules-available/mod-http-martd.conf
COPY nginx-conf/martd.conf /etc/nginx/martd.conf
# Debian's layout too (as the libnginx-mod-http-martd package installs it), so that the stock
# /etc/nginx/nginx.conf loads the module. The container's listener: all interfaces, port 8080.
# Check that Debian's nginx accepts the module and the configuration.
RUN ln -s /usr/share/nginx/modules-available/mod-http-martd.conf /etc/nginx/modules-enabled/50-mod-http-martd.conf \
 && sed -i 's/^\( *\)listen 127\.0\.0\.1:8080;/\1listen 8080;/' /etc/nginx/martd.conf \
 && grep -q '^ *listen 8080;$' /etc/nginx/martd.conf \
 && nginx -t -q -p /var/lib/martd/ -c /etc/nginx/martd.conf \
        -g 'load_module /usr/lib/nginx/modules/ngx_http_martd_module.so; user www-data;'
EXPOSE 8080
# SIGQUIT: graceful shutdown; waiting listeners get 304 and reconnect elsewhere.
STOPSIGNAL SIGQUIT
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "--max-time", "4", "http://127.0.0.1:8080/"]
# Master as root (it binds the port and reads the configuration), workers as www-data; error log
# on stderr, access log on stdout.
CMD ["nginx", "-p", "/var/lib/martd/", "-c", "/etc/nginx/martd.conf", \
     "-g", "load_module /usr/lib/nginx/modules/ngx_http_martd_module.so; user www-data;"]
