//! Rotating `state_secret`: with `state_secret = [new, old]` the new key signs and both
//! verify, so a consent begun before the rotation completes after it (its PKCE verifier
//! still matches the challenge the strict upstream holds) and admin sessions survive it;
//! dropping the old key ends them. Three broker processes in turn, each with the keys of
//! one stage, behind the first one's public URL.

use crate::support::{
    consent_until_callback, free_port, random, BrokerConfig, BrokerProcess, Upstream,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_keeps_consents_in_flight_and_sessions_until_the_old_key_goes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, new) = (random("old-state-secret"), random("new-state-secret"));
    let first = free_port();
    let public = format!("http://127.0.0.1:{first}");
    let upstream = Upstream::start(
        &format!("{public}/api/callback"),
        "client_secret_basic",
        3600,
    )
    .await;
    let stage = |name: &str, keys: toml::Value| {
        let stage_dir = dir.path().join(name);
        std::fs::create_dir(&stage_dir).expect("dir");
        BrokerConfig::default()
            .top("state_secret", keys)
            .file_store(&dir.path().join("tokens"))
            .tables(&upstream.connection_toml(
                "acme",
                &format!("client_secret = \"{}\"", upstream.client_secret),
            ))
            .write(&stage_dir)
    };
    let log = dir.path().join("broker.log");
    let behind_public = vec![("BROKER_PUBLIC_URL", public.clone())];

    // Before: the old key alone. An admin starts a consent (and gets a session).
    let before = stage("before", old.clone().into());
    let mut broker = BrokerProcess::start_on(first, &before, &[], &log).await;
    let browser = consent_until_callback(&public, "acme").await;
    broker.stop().await;

    // During: [new, old]. The consent completes; the session still opens the status page.
    let during = stage("during", vec![new.clone(), old.clone()].into());
    let port = free_port();
    let mut broker = BrokerProcess::start_on(port, &during, &behind_public, &log).await;
    let callback = browser.callback_url.replace(&public, &broker.base);
    let page = browser
        .client
        .get(&callback)
        .send()
        .await
        .expect("callback");
    assert_eq!(page.status(), 200);
    assert!(page.text().await.expect("page").contains("Connected"));
    let status = |base: &str| {
        let client = browser.client.clone();
        let url = format!("{base}/api/connections");
        async move {
            let response = client
                .get(url)
                .header("Accept", "application/json")
                .send()
                .await
                .expect("status page");
            response.status().as_u16()
        }
    };
    assert_eq!(status(&broker.base).await, 200, "the old session survives");
    broker.stop().await;

    // After: the new key alone. The old session is over.
    let after = stage("after", vec![new.clone()].into());
    let port = free_port();
    let mut broker = BrokerProcess::start_on(port, &after, &behind_public, &log).await;
    assert_eq!(
        status(&broker.base).await,
        401,
        "the old session is refused"
    );
    broker.stop().await;
    let logs = std::fs::read_to_string(&log).expect("log");
    assert!(
        !logs.contains(&old) && !logs.contains(&new),
        "a key was logged"
    );
}
