//! The audit trail at `RUST_LOG=warn`: every handout (cached, refreshed, proxied) and every
//! refusal of an authenticated caller writes its event, as a JSON line with the caller and
//! the connection; unauthenticated attempts are counted; and no token, key or secret is in
//! any line.

use serde_json::Value;

use crate::callers::{Credential, Setup, ADF, FINANCE_KEY, OPS_KEY};
use crate::support::ADMIN_KEY;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_handout_and_refusal_is_written_whatever_the_log_level() {
    let env = [
        ("RUST_LOG", "warn".to_owned()),
        ("BROKER_LOG_FORMAT", "json".to_owned()),
    ];
    let mut setup = Setup::start(&env).await;
    let finance = Credential::Key(FINANCE_KEY);
    let adf = setup.bearer(ADF);
    let mut handed = Vec::new();
    for credential in [&finance, &finance, &adf] {
        let (status, body) = setup.call("GET", "/api/refresh/acme", credential).await;
        assert_eq!(status, 200, "{body}");
        handed.push(body["access_token"].as_str().expect("token").to_owned());
    }
    // Refreshes the caller asks for, until the connection's budget refuses one (429).
    let mut forced = 0;
    loop {
        let (status, body) = setup
            .call("POST", "/api/refresh/acme?force=true", &finance)
            .await;
        match status {
            200 => handed.push(body["access_token"].as_str().expect("token").to_owned()),
            429 => break,
            other => panic!("{other}: {body}"),
        }
        forced += 1;
        assert!(forced < 20, "no budget");
    }
    let (status, _) = setup
        .call("GET", "/api/proxy/acme/invoices?page=1", &adf)
        .await;
    assert_eq!(status, 200);
    setup
        .refused(
            "GET",
            "/api/refresh/acme",
            &Credential::Key(OPS_KEY),
            "`ops`",
        )
        .await;
    for _ in 0..3 {
        let (status, _) = setup
            .call(
                "GET",
                "/api/refresh/acme",
                &Credential::Key("not-a-key-0123456789"),
            )
            .await;
        assert_eq!(status, 401);
    }
    // Stopped as the platform stops it: what the audit writer still queues is written.
    setup.broker.terminate().await;

    let log = std::fs::read_to_string(setup.dir.path().join("broker.log")).expect("log");
    let events: Vec<Value> = log
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| event["target"] == "token_broker::audit")
        .collect();
    let fields = |message: &str| -> Vec<&Value> {
        events
            .iter()
            .filter(|e| e["fields"]["message"] == message)
            .map(|e| &e["fields"])
            .collect()
    };
    let issued = fields("token_issued");
    let by = |caller: &str, source: &str, route: &str| {
        issued
            .iter()
            .filter(|e| e["caller"] == caller && e["source"] == source && e["route"] == route)
            .count()
    };
    let refresh = "/api/refresh/{connection}";
    assert_eq!(by("finance", "cached", refresh), 2, "{issued:?}");
    assert_eq!(by(ADF, "cached", refresh), 1, "{issued:?}");
    assert_eq!(by("finance", "refreshed", refresh), forced, "{issued:?}");
    assert_eq!(
        by(ADF, "cached", "/api/proxy/{connection}/{path}"),
        1,
        "{issued:?}"
    );
    // The consent names the admin who began it: the admin key (a list: `admin-key-1`)
    // whose `?key=` opened the browser's session.
    assert_eq!(
        by("admin-key-1", "consent", "/api/callback"),
        1,
        "{issued:?}"
    );
    assert!(issued.iter().all(|e| e["connection"] == "acme"
        && e["token_id"].as_str().is_some_and(|id| id.len() == 16)
        && e["expires_at"].is_string()));
    // The managed identity's client is named.
    assert!(issued
        .iter()
        .filter(|e| e["caller"] == ADF)
        .all(|e| e["app_id"] == "00000000-0000-0000-0000-0000000000a1"));
    // One token handed out twice from the cache: one fingerprint.
    let cached: Vec<&Value> = issued
        .iter()
        .filter(|e| e["caller"] == "finance" && e["source"] == "cached")
        .map(|e| &e["token_id"])
        .collect();
    assert_eq!(cached[0], cached[1]);

    let refused = fields("token_refused");
    let refusal = |caller: &str, code: &str| {
        refused
            .iter()
            .any(|e| e["caller"] == caller && e["error"] == code && e["connection"] == "acme")
    };
    assert!(refusal("ops", "caller_not_allowed"), "{refused:?}");
    assert!(refusal("finance", "force_rate_limited"), "{refused:?}");
    let counted: u64 = fields("unauthenticated_attempts")
        .iter()
        .filter_map(|e| e["count"].as_u64())
        .sum();
    assert!(
        (1..=3).contains(&counted),
        "counted, not one line each: {counted}"
    );

    // Nothing secret in any line of the log.
    let mut secrets = setup.upstream.secrets_seen().await;
    secrets.extend(handed);
    secrets.extend(
        [
            FINANCE_KEY,
            OPS_KEY,
            ADMIN_KEY,
            setup.upstream.client_secret.as_str(),
        ]
        .map(str::to_owned),
    );
    for secret in secrets.iter().filter(|s| s.len() >= 8) {
        assert!(!log.contains(secret.as_str()), "a secret is in the log");
    }
}
