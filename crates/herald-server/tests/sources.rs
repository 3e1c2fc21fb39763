//! `[[sources]]` through the `herald` binary: `check-config` accepts a valid source and names
//! the mistake in a bad one without connecting anywhere; `outbox-sql` prints the outbox DDL.
//! Consuming the real brokers is tested in `tests/interop/python/test_sources.py`.

mod common;

use common::process::run;

const BASE: &str = "[api]\nkeys = [\"0123456789abcdef0123\"]\n[token]\nhmac_secret = \"0123456789abcdef0123456789abcdef\"\n";

fn check(source: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("herald.toml"), format!("{BASE}{source}")).expect("write");
    run(&["check-config", "--config", "herald.toml"], dir.path())
}

#[test]
fn check_config_accepts_sources_and_names_what_is_wrong() {
    // Nothing listens on these ports: check-config must not connect.
    let valid = r#"
[[sources]]
name = "sensors"
kind = "nats"
url = "nats://127.0.0.1:1"
stream = "SENSORS"
[sources.mapping]
channel = "sensors:{subject.1}"

[[sources]]
name = "outbox"
kind = "postgres"
url = "postgres://nobody@127.0.0.1:1/db"
"#;
    let (code, stdout, stderr) = check(valid);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("ok"), "{stdout}");

    for (source, expected) in [
        (
            "[[sources]]\nname = \"q\"\nkind = \"rabbitmq\"\nurl = \"amqp://h\"\nqueue = \"q\"\n[sources.mapping]\nchannel = \"x:{subject}\"\n",
            "unknown placeholder {subject}",
        ),
        (
            "[[sources]]\nname = \"r\"\nkind = \"redis\"\nurl = \"redis://h\"\n",
            "needs `stream`",
        ),
        (
            "[[sources]]\nname = \"p\"\nkind = \"postgres\"\nurl = \"postgres://h/db\"\ntable = \"x; drop\"\n",
            "not a usable name",
        ),
        (
            "[[sources]]\nname = \"p\"\nkind = \"postgres\"\nurl = \"postgres://h/db?sslmode=require&sslrootcert=/ca.pem\"\n",
            "use sslmode=verify-ca or verify-full",
        ),
        (
            "[[sources]]\nname = \"n\"\nkind = \"kafka\"\nurl = \"x\"\n",
            "kafka",
        ),
        (
            "[[sources]]\nname = \"n\"\nkind = \"nats\"\nurl = \"nats://h\"\nstream = \"S\"\nstreem = \"x\"\n",
            "streem",
        ),
    ] {
        let (code, _, stderr) = check(source);
        assert_ne!(code, 0, "{source}");
        assert!(stderr.contains(expected), "{expected:?} not in {stderr}");
    }
}

#[test]
fn outbox_sql_prints_the_table_and_its_trigger() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (code, stdout, stderr) = run(&["outbox-sql", "--table", "app.events_outbox"], dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("CREATE TABLE IF NOT EXISTS \"app\".\"events_outbox\""),
        "{stdout}"
    );
    assert!(stdout.contains("pg_notify('app_events_outbox'"), "{stdout}");
    let (code, _, stderr) = run(&["outbox-sql", "--table", "bad name"], dir.path());
    assert_ne!(code, 0);
    assert!(stderr.contains("not a usable name"), "{stderr}");
}
