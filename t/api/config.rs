//! The new directives: bad values rejected by `nginx -t` at the directive's line, good ones
//! accepted at every level and inherited downwards.

use super::*;

fn assert_emerg_at(e: &ConfigError, needle: &str) {
    let line = e
        .stderr
        .lines()
        .find(|l| l.contains("[emerg]"))
        .unwrap_or_else(|| panic!("no [emerg] for {needle:?}: {}", e.stderr));
    assert!(
        line.ends_with(&e.location_of(needle)),
        "emerg does not point at {needle:?} ({}): {line}",
        e.location_of(needle)
    );
}

#[test]
fn bad_new_directives_rejected() {
    let cases: &[(&str, &str)] = &[
        ("martd_push jsn;", "location"),
        ("martd_push json json;", "location"),
        ("martd_listen xml;", "location"),
        ("martd_listen json 1;", "location"),
        ("martd_push json;", "server"),
        ("martd_listen json;", "server"),
        ("martd_message_buffer_length_max abc;", "server"),
        ("martd_message_buffer_length_max -1;", "location"),
        ("martd_message_buffer_length_max;", "location"),
        ("martd_max_channels_per_request many;", "server"),
        ("martd_max_channels_per_request -2;", "location"),
        ("martd_client_js foo=bar;", "location"),
        ("martd_client_js /sub;", "location"),
        ("martd_client_js sub=/a pub=/b extra=1;", "location"),
        ("martd_client_js;", "server"),
        ("martd_message_buffer_length_max 5; martd_message_buffer_length_max 6;", "location"),
    ];
    for (directive, ctx) in cases {
        let conf = match *ctx {
            "server" => Conf::new(&format!("        {directive}\n{}", pubsub("", ""))),
            _ => Conf::new(&format!("        location = /bad {{ {directive} }}\n")),
        };
        let e = expect_config_error(&conf);
        assert_emerg_at(&e, directive);
    }
}

#[test]
fn good_new_directives_at_every_level() {
    let all = "martd_message_buffer_length_max 50; martd_max_channels_per_request 8;";
    let conf = Conf::new(&format!(
        "        {all}
        location = /p {{ martd_push json; {all} }}
        location = /l {{ martd_listen json; {all} }}
        location = /r {{ martd_push; martd_message_buffer_length_max 0; }}
        location = /js {{ martd_client_js; }}
        location = /js2 {{ martd_client_js pub=/p sub=/l; }}
        location = /js3 {{ martd_client_js sub=https://push.example.com/l?x=1; }}
"
    ))
    .http(&format!("martd_shm_size 1m; {all}"));
    expect_config_ok(&conf);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_inherited_from_http_and_server() {
    let mut conf = api_conf(
        "        martd_max_channels_per_request 2;
        location = /jsub-own { martd_listen json; martd_max_channels_per_request 3; }
        location = /jpub-own { martd_push json; martd_message_buffer_length_max 7; }
",
    );
    conf = conf.http("martd_message_buffer_length_max 5;");
    let ng = Nginx::start(conf);
    let mut c = Conn::open_probed(ng.port).await;
    jpub(&mut c, "i1", "size=5", "m").await;
    let r = c.send("POST", "/jpub?channel=i1&size=6", &[], "m").await;
    expect_json_error(&r, 400, "size over the http-level maximum");
    jpub(&mut c, "i1", "", "m").await;
    let r = c.send("POST", "/jpub-own?channel=i1&size=7", &[], "m").await;
    expect_pub_reply(&r, "the location's own maximum");
    let three = [("i1", "0"), ("i2", "0"), ("i3", "0")];
    let r = c.get(&jsub("/jsub", &three), &[]).await;
    expect_json_error(&r, 400, "3 channels over the server-level maximum of 2");
    let r = c.get(&jsub("/jsub", &three[..2]), &[]).await;
    expect_channels(&r, "2 channels");
    let r = c.get(&jsub("/jsub-own", &three), &[]).await;
    expect_channels(&r, "3 channels with the location's own maximum");
    ng.finish();
}
