use super::*;
use crate::config::{Config, RpcAuth, StartHeight as ParsedStart};

#[test]
fn a_built_config_with_every_table_parses_as_the_daemon_reads_it() {
    let text = ConfigBuilder::regtest()
        .data_dir("/tmp/chainwatch-data")
        .default_confirmations(2)
        .start_height(StartHeight::Height(120))
        .finality_depth(5)
        .node_unreachable_after("1s")
        .bitcoind(Bitcoind::cookie("http://127.0.0.1:18443", "/tmp/.cookie").poll_interval("300ms"))
        .endpoint(
            Endpoint::new("shop", "http://127.0.0.1:9/hooks")
                .secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
                .events(["tx.*", "alert.*"])
                .timeout("60s")
                .retry_schedule(["300ms", "1s"]),
        )
        .endpoint(
            Endpoint::new("bulk", "http://127.0.0.1:10/hooks")
                .secrets([
                    "whsec_bmV3IHNlY3JldCBmb3Igcm90YXRpb24gdGVzdHMh",
                    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                ])
                .ordered(false)
                .concurrency(4),
        )
        .watch(
            WatchEntry::address("bcrt1q5nrgwcwrnyy904s3vhlpnlmpkjypk9alphelkp")
                .confirmations(3)
                .label("order-1000")
                .meta("order_id", 1000),
        )
        .watch(WatchEntry::address("n3iet9u1ki76AoPrk9p6NUhjqxeyQfihSg"))
        .api(
            Api::listen("127.0.0.1:0")
                .token("t0ken-for-tests-7f3a9c21d4e8b6f0a5c2e9d1")
                .allow_ips(["127.0.0.1/32"]),
        )
        .retention(Retention {
            attempts: Some("2m".into()),
            events: Some("10m".into()),
        })
        .to_toml();
    let cfg = Config::parse(&text, "built", None).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(cfg.data_dir, PathBuf::from("/tmp/chainwatch-data"));
    assert_eq!(cfg.default_confirmations, 2);
    assert_eq!(cfg.start_height, ParsedStart::Height(120));
    assert_eq!(cfg.finality_depth, 5);
    assert!(matches!(&cfg.bitcoind.auth, RpcAuth::Cookie(p) if p == Path::new("/tmp/.cookie")));
    assert_eq!(cfg.bitcoind.poll_interval.as_millis(), 300);
    assert_eq!(cfg.endpoints.len(), 2);
    assert_eq!(cfg.endpoints[0].events, ["tx.*", "alert.*"]);
    assert_eq!(cfg.endpoints[0].retry_schedule.len(), 2);
    assert_eq!(cfg.endpoints[1].secrets.len(), 2);
    assert!(!cfg.endpoints[1].ordered);
    assert_eq!(cfg.endpoints[1].concurrency, 4);
    assert_eq!(cfg.watches.len(), 2);
    assert_eq!(cfg.watches[0].confirmations, 3);
    assert_eq!(cfg.watches[1].confirmations, 2, "the default_confirmations");
    assert_eq!(cfg.api.allow_ips, ["127.0.0.1/32"]);
    assert_eq!(cfg.retain_events.map(|d| d.as_secs()), Some(600));
}

#[test]
fn keys_not_set_are_not_written_and_tip_is_a_word() {
    let text = ConfigBuilder::default()
        .start_height(StartHeight::Tip)
        .to_toml();
    assert_eq!(text.trim(), "start_height = \"tip\"");
    let cfg = Config::parse(&text, "built", None).unwrap();
    assert_eq!(cfg.start_height, ParsedStart::Tip);
    assert_eq!(
        cfg.data_dir,
        PathBuf::from("./data"),
        "the daemon's default"
    );
}
