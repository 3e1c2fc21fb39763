//! `herald check-config` on `[[sinks]]`: a good entry passes without any broker running, each
//! mistake is refused naming the sink and the key, and a URL's password is never printed.

mod common;

use common::process::run;

fn check(config: &str) -> (i32, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("herald.toml"), config).expect("write");
    let (code, _, stderr) = run(&["check-config", "--config", "herald.toml"], dir.path());
    (code, stderr)
}

#[test]
fn good_sinks_pass_without_a_broker() {
    let (code, stderr) = check(
        r#"
[[sinks]]
name = "k"
kind = "kafka"
url = "127.0.0.1:1"
topic = "t"
channels = ["orders:*"]

[[sinks]]
name = "r"
kind = "rabbitmq"
url = "amqp://guest:guest@127.0.0.1:1/%2f"
exchange = "x"
routing_key = "herald.{namespace}.{name}"
channels = ["*"]

[[sinks]]
name = "n"
kind = "nats"
url = "nats://127.0.0.1:1"
subject = "herald.{channel}"
nats_mode = "jetstream"
channels = ["chat:*"]
enabled = false
"#,
    );
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn each_mistake_names_the_sink_and_key() {
    let cases = [
        (
            "name = \"k\"\nkind = \"kafka\"\nurl = \"127.0.0.1:1\"\nchannels = [\"*\"]",
            "topic is missing",
        ),
        (
            "name = \"k\"\nurl = \"127.0.0.1:1\"\ntopic = \"t\"\nchannels = [\"*\"]",
            "kind is missing",
        ),
        (
            "name = \"r\"\nkind = \"rabbitmq\"\nurl = \"amqp://h\"\nrouting_key = \"{chan}\"\nchannels = [\"*\"]",
            "unknown placeholder {chan}",
        ),
        (
            "name = \"n\"\nkind = \"nats\"\nurl = \"nats://h:1\"\nchannels = [\"*\"]\nnats_mode = \"sometimes\"",
            "nats_mode",
        ),
        (
            "name = \"k\"\nkind = \"kafka\"\nurl = \"h:1\"\ntopic = \"t\"\nchannels = [\"*\"]\ntopics = \"t\"",
            "unknown field",
        ),
        (
            "name = \"k k\"\nkind = \"kafka\"\nurl = \"h:1\"\ntopic = \"t\"\nchannels = [\"*\"]",
            "name \"k k\"",
        ),
    ];
    for (entry, expected) in cases {
        let (code, stderr) = check(&format!("[[sinks]]\n{entry}\n"));
        assert_ne!(code, 0, "{entry}");
        assert!(stderr.contains(expected), "{entry}: {stderr}");
    }
}

#[test]
fn a_bad_amqp_url_is_refused_without_its_password() {
    let (code, stderr) = check(
        "[[sinks]]\nname = \"r\"\nkind = \"rabbitmq\"\nurl = \"http://guest:s3cret@h/\"\nchannels = [\"*\"]\n",
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("sink r"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "{stderr}");
}
