# martd: sourced by nginx's auto/make after objs/Makefile is written; appends the rule that
# builds the Rust static library with cargo. Variables martd_* come from ./config.

if [ "$martd_link" = DYNAMIC ]; then
    martd_product="$NGX_OBJS${ngx_dirsep}ngx_http_martd_module$ngx_modext"
else
    martd_product="$NGX_OBJS${ngx_dirsep}nginx$ngx_binext"
fi

case "$martd_profile" in
    release) martd_profile_arg=--release ;;
    *)       martd_profile_arg="--profile $martd_profile" ;;
esac

cat << END                                            >> $NGX_MAKEFILE

# martd (Rust): cargo decides what is stale, so the library rule always runs.

$martd_product:	$martd_lib

$martd_lib:	martd_cargo_always
	+cd "$martd_dir" && \\
	NGINX_SOURCE_DIR="$martd_src_dir" NGINX_BUILD_DIR="$martd_objs_dir" \\
	"$martd_cargo" rustc --manifest-path "$martd_dir/Cargo.toml" -p martd \\
		--lib --crate-type staticlib --no-default-features \\
		$martd_profile_arg --target-dir "$martd_target_dir" ${MARTD_CARGO_FLAGS:-}

martd_cargo_always:

.PHONY:	martd_cargo_always

END
