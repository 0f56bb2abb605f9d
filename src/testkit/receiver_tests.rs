use super::*;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

async fn post(url: &str, id: &str, signature: Option<&str>, body: &str) -> u16 {
    crate::net::install_crypto_provider();
    let now = crate::event::now_ms() / 1000;
    let sig = signature.map(str::to_string).unwrap_or_else(|| {
        Secret::parse(SECRET)
            .unwrap()
            .sign(id, now, body.as_bytes())
    });
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(url)
        .header("webhook-id", id)
        .header("webhook-timestamp", now.to_string())
        .header("webhook-signature", sig)
        .body(body.to_string())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_verifying_receiver_accepts_signed_requests_and_refuses_forged_ones() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let r = Receiver::builder()
        .secrets(vec![Secret::parse(SECRET).unwrap()])
        .reply(Reply::Verdict)
        .forward_to(tx)
        .bind_loopback(0)
        .await
        .unwrap();
    let body = r#"{"type":"tx.pending","data":{"sequence":1}}"#;
    assert_eq!(post(&r.url, "evt_1", None, body).await, 204);
    assert_eq!(post(&r.url, "evt_2", Some("v1,Zm9yZ2Vk"), body).await, 401);
    let all = r.all();
    assert_eq!(all.len(), 2);
    assert!(all[0].verified() && !all[1].verified());
    assert_eq!((all[0].answered, all[1].answered), (204, 401));
    assert_eq!(
        (all[0].kind(), all[0].path.as_str()),
        ("tx.pending", "/hooks")
    );
    assert_eq!(r.accepted().len(), 1);
    let forwarded = rx.recv().await.unwrap();
    assert_eq!((forwarded.id.as_str(), forwarded.answered), ("evt_1", 204));
    assert!(describe(&forwarded).starts_with("verified #1 "));
    assert!(describe(&rx.recv().await.unwrap()).starts_with("REJECTED #1 "));
}

#[tokio::test]
async fn scripted_replies_come_first_then_the_usual_one() {
    let r = Receiver::start().await;
    r.push(Reply::Status(500));
    r.push(Reply::RetryAfter(429, 7));
    for want in [500, 429, 204] {
        assert_eq!(post(&r.url, "evt", None, "{}").await, want);
    }
    r.set_status(410);
    assert_eq!(post(&r.url, "evt", None, "{}").await, 410);
    let answered: Vec<u16> = r.all().iter().map(|c| c.answered).collect();
    assert_eq!(answered, [500, 429, 204, 410]);
    assert!(
        !r.all()[0].verified(),
        "no secret: nothing is called verified"
    );
    r.wait_accepted(1, Duration::from_secs(1)).await;
    assert!(r.connections() >= 1);
}

#[tokio::test]
async fn a_held_request_is_seen_before_it_is_answered() {
    let r = Receiver::start().await;
    r.set_hang(Duration::from_millis(300));
    let url = r.url.clone();
    let sent = tokio::spawn(async move { post(&url, "evt", None, "{}").await });
    r.wait_requests(1, Duration::from_secs(5)).await;
    assert_eq!(r.all()[0].answered, 0, "still held");
    assert_eq!(sent.await.unwrap(), 204);
    assert_eq!(r.accepted_count(), 1);
}
