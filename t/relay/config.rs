//! Bad and good configurations.

use super::*;

// 15. bad configuration

fn assert_emerg_at(e: &ConfigError, needle: &str, mentions: &[&str]) {
    assert!(e.stderr.contains("[emerg]"), "no [emerg] for {needle:?}: {}", e.stderr);
    let line = e.stderr.lines().find(|l| l.contains("[emerg]")).unwrap().to_string();
    assert!(
        line.ends_with(&e.location_of(needle)),
        "emerg does not point at the directive ({}): {line}",
        e.location_of(needle)
    );
    for m in mentions {
        assert!(line.contains(m), "emerg does not mention {m:?}: {line}");
    }
}

#[test]
fn bad_config_shm_size() {
    for size in ["1k", "255k", "0", "abc"] {
        let d = format!("martd_shm_size {size};");
        let e = expect_config_error(&std_conf().http(&d));
        assert_emerg_at(&e, &d, &["martd_shm_size"]);
    }
    expect_config_ok(&std_conf().http("martd_shm_size 256k;"));
}

#[test]
fn bad_config_values_rejected() {
    let cases: &[(&str, &str, &[&str])] = &[
        // nginx's enum slot names the value, not the directive.
        ("martd_listener_concurrency bogus;", "server", &["bogus"]),
        ("martd_store_messages maybe;", "server", &["maybe", "martd_store_messages"]),
        ("martd_authorized_channels_only 2;", "server", &["martd_authorized_channels_only"]),
        ("martd_detach_listeners sometimes;", "server", &["martd_detach_listeners"]),
        ("martd_message_buffer_length -1;", "server", &["martd_message_buffer_length"]),
        ("martd_message_buffer_length many;", "server", &["martd_message_buffer_length"]),
        ("martd_max_listeners x;", "server", &["martd_max_listeners"]),
        ("martd_max_channel_id_length ten;", "server", &["martd_max_channel_id_length"]),
        ("martd_listener_timeout forever;", "server", &["martd_listener_timeout"]),
        ("martd_message_timeout soon;", "server", &["martd_message_timeout"]),
        ("martd_channel_timeout later;", "server", &["martd_channel_timeout"]),
        ("martd_channel_id;", "server", &["martd_channel_id"]),
        ("martd_channel_id a b;", "server", &["martd_channel_id"]),
        ("martd_shm_size 1m;", "server", &["martd_shm_size"]),
        ("martd_push on;", "location", &["martd_push"]),
        ("martd_listen 1;", "location", &["martd_listen"]),
        ("martd_push;", "server", &["martd_push"]),
        ("martd_shm_size 1m; martd_shm_size 2m;", "http", &["martd_shm_size"]),
    ];
    for (directive, ctx, mentions) in cases {
        let conf = match *ctx {
            "http" => std_conf().http(directive),
            "server" => Conf::new(&format!("        {directive}\n{}", pubsub("", ""))),
            _ => Conf::new(&format!("        location = /bad {{ {directive} }}\n")),
        };
        let e = expect_config_error(&conf);
        assert_emerg_at(&e, directive, mentions);
    }
}

#[test]
fn good_config_every_directive_at_every_level() {
    let all = "martd_channel_id $arg_channel; martd_message_buffer_length 5; \
               martd_message_timeout 10m; martd_store_messages on; martd_listener_timeout 30s; \
               martd_listener_concurrency last; martd_max_channel_id_length 64; \
               martd_max_listeners 10; martd_authorized_channels_only off; martd_channel_timeout 1m; \
               martd_detach_listeners off;";
    let conf = Conf::new(&format!("        {all}\n{}", pubsub(all, all)))
        .http(&format!("martd_shm_size 1m; {all}"));
    expect_config_ok(&conf);
    for zero in [
        "martd_message_buffer_length 0;",
        "martd_message_timeout 0;",
        "martd_listener_timeout 0;",
        "martd_max_listeners 0;",
        "martd_listener_concurrency first;",
        "martd_listener_concurrency broadcast;",
        "martd_store_messages off;",
    ] {
        expect_config_ok(&Conf::new(&pubsub(zero, zero)));
    }
}
