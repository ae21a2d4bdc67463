# shellcheck shell=bash
# Shared helpers for scripts/*: sourced, not run. Bash only.
# shellcheck disable=SC2034 # MARTD_ROOT is for the scripts that source this

MARTD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Packages the build needs on Debian/Ubuntu: a C toolchain and make for nginx, clang/libclang for
# bindgen, and the headers nginx's ./configure looks for (pcre2, openssl, zlib).
MARTD_DEB_PACKAGES=(gcc libc6-dev make pkg-config clang libclang-dev
    libpcre2-dev libssl-dev zlib1g-dev curl ca-certificates perl)

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

is_debian_like() {
    [ -r /etc/os-release ] || return 1
    local id id_like
    id=$(. /etc/os-release && echo "${ID:-}")
    id_like=$(. /etc/os-release && echo "${ID_LIKE:-}")
    case " $id $id_like " in
        *" debian "* | *" ubuntu "*) return 0 ;;
    esac
    return 1
}

as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

# apt-get install the given packages that are not installed yet. `apt-get update` runs once per
# script run, and only when something is missing. Services that packages would start (nginx on
# port 80) are kept from starting when the machine has no policy-rc.d of its own.
_martd_apt_updated=
apt_install_missing() {
    command -v dpkg-query >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 || {
        log "not a Debian/Ubuntu system: make sure these are installed: $*"
        return 0
    }
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' \
            || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]}"
    if [ -z "$_martd_apt_updated" ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null
        _martd_apt_updated=1
    fi
    apt_no_services install -y -q --no-install-recommends "${missing[@]}" \
        || die "apt-get install ${missing[*]} failed"
}

# `apt-get "$@"` as root, non-interactive, keeping services that packages would start or reload
# (nginx on port 80) from being started, when the machine has no policy-rc.d of its own.
apt_no_services() {
    local policy=/usr/sbin/policy-rc.d made_policy=
    if [ ! -e "$policy" ]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
        made_policy=1
    fi
    local rc=0
    as_root env DEBIAN_FRONTEND=noninteractive apt-get "$@" </dev/null || rc=$?
    [ -n "$made_policy" ] && as_root rm -f "$policy"
    return $rc
}

# Rust: use what is there (PATH or ~/.cargo/bin); install with rustup only if cargo is absent.
ensure_rust() {
    if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        log "cargo not found: installing Rust with rustup"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
            | sh -s -- -y --profile minimal --component rustfmt,clippy \
            || die "could not install Rust with rustup; install Rust >= 1.81 (cargo, rustfmt, clippy) and retry"
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    local comp
    for comp in "$@"; do
        if ! cargo "$comp" --version >/dev/null 2>&1; then
            command -v rustup >/dev/null 2>&1 || die "cargo $comp is missing and there is no rustup to add it"
            log "adding the $comp component with rustup"
            rustup component add "$comp" </dev/null || die "rustup component add $comp failed"
        fi
    done
}

# Everything the build needs. Extra arguments are cargo subcommands that must exist (fmt, clippy).
ensure_build_deps() {
    if is_debian_like; then
        apt_install_missing "${MARTD_DEB_PACKAGES[@]}"
    else
        log "not Debian/Ubuntu: not installing packages (need cc, make, clang/libclang, pcre2, openssl and zlib headers)"
    fi
    ensure_rust "$@"
}

# A TCP port on 127.0.0.1 that nobody listens on right now.
free_port() {
    perl -MIO::Socket::INET -e \
        'my $s = IO::Socket::INET->new(LocalAddr => "127.0.0.1", LocalPort => 0, Listen => 1, ReuseAddr => 1) or die "$!\n"; print $s->sockport, "\n";'
}

# From the JSON messages of `cargo build --message-format=json...` on stdin, the nginx build
# directory that nginx-sys used (build.rs exports it as MARTD_NGINX_BUILD_DIR; the vendored
# nginx-sys build keeps it in its OUT_DIR/objs).
nginx_build_dir_from_cargo_json() {
    local json dir
    json=$(cat)
    dir=$(printf '%s\n' "$json" | grep -o '"MARTD_NGINX_BUILD_DIR","[^"]*"' | tail -n 1 \
        | sed 's/^"MARTD_NGINX_BUILD_DIR","//; s/"$//')
    if [ -z "$dir" ]; then
        dir=$(printf '%s\n' "$json" | grep '"reason":"build-script-executed"' | grep 'nginx-sys@' \
            | grep -o '"out_dir":"[^"]*"' | tail -n 1 | sed 's/^"out_dir":"//; s/"$//')
        [ -n "$dir" ] && dir="$dir/objs"
    fi
    printf '%s\n' "$dir"
}

# From the same JSON, the path of the module .so cargo produced.
module_so_from_cargo_json() {
    grep '"reason":"compiler-artifact"' | grep -o '"[^"]*/libngx_http_martd_module\.so"' \
        | tail -n 1 | tr -d '"'
}
