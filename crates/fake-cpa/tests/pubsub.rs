//! RESP pub/sub of the fake CPA, as the real v7.2.140 behaves (bytes captured from it): usage
//! records go to subscribers instead of the queue, a full subscriber is dropped, control
//! payloads, the errors channel, and what a subscription connection accepts.

use std::time::Duration;

use fake_cpa::{FakeCpa, SimConfig, SimCredential, SimQuota};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const KEY: &str = "sim-management-key";
const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(200);
const SUBSCRIBED_USAGE: &[u8] = b"*3\r\n$9\r\nsubscribe\r\n$5\r\nusage\r\n:1\r\n*3\r\n$7\r\nmessage\r\n$5\r\nusage\r\n$24\r\n{\"support_refresh\":true}\r\n";
const SUBSCRIBED_ERRORS: &[u8] = b"*3\r\n$9\r\nsubscribe\r\n$6\r\nerrors\r\n:1\r\n";
const UNSUBSCRIBED_USAGE: &[u8] = b"*3\r\n$11\r\nunsubscribe\r\n$5\r\nusage\r\n:0\r\n";
const INDEX: &str = "57b8ed21a304e3d0";

fn cmd(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    out
}

fn message(channel: &str, payload: &str) -> Vec<u8> {
    format!(
        "*3\r\n$7\r\nmessage\r\n${}\r\n{channel}\r\n${}\r\n{payload}\r\n",
        channel.len(),
        payload.len()
    )
    .into_bytes()
}

fn addr(cpa: &FakeCpa) -> String {
    cpa.url().trim_start_matches("http://").to_owned()
}

async fn start() -> FakeCpa {
    FakeCpa::start(SimConfig::default()).await.expect("start")
}

async fn send(s: &mut TcpStream, args: &[&str]) {
    s.write_all(&cmd(args)).await.expect("write");
}

/// The next bytes are exactly `want`.
async fn expect(s: &mut TcpStream, want: &[u8]) {
    let mut got = vec![0u8; want.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut got))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));
}

/// Nothing more arrives for a while.
async fn quiet(s: &mut TcpStream) {
    let mut buf = [0u8; 256];
    if let Ok(read) = tokio::time::timeout(QUIET, s.read(&mut buf)).await {
        let n = read.expect("read");
        panic!("unexpected {:?}", String::from_utf8_lossy(&buf[..n]));
    }
}

/// Everything until the server closes the connection.
async fn until_eof(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut all))
        .await
        .expect("closed in time")
        .expect("read");
    all
}

async fn authed(cpa: &FakeCpa) -> TcpStream {
    let mut s = TcpStream::connect(addr(cpa)).await.expect("connect");
    send(&mut s, &["AUTH", KEY]).await;
    expect(&mut s, b"+OK\r\n").await;
    s
}

async fn subscribed_usage(cpa: &FakeCpa) -> TcpStream {
    let mut s = authed(cpa).await;
    send(&mut s, &["SUBSCRIBE", "usage"]).await;
    expect(&mut s, SUBSCRIBED_USAGE).await;
    s
}

async fn subscribed_errors(cpa: &FakeCpa) -> TcpStream {
    let mut s = authed(cpa).await;
    send(&mut s, &["SUBSCRIBE", "errors"]).await;
    expect(&mut s, SUBSCRIBED_ERRORS).await;
    s
}

async fn eventually(mut done: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("condition in time");
}

#[tokio::test]
async fn subscribing_answers_as_cpa_and_usage_starts_with_support_refresh() {
    let cpa = start().await;
    let mut usage = subscribed_usage(&cpa).await;
    quiet(&mut usage).await;
    let mut errors = subscribed_errors(&cpa).await;
    quiet(&mut errors).await;
    // The channel is matched in any case and named back as the client spelled it.
    let mut shouting = authed(&cpa).await;
    send(&mut shouting, &["subscribe", " USAGE "]).await;
    expect(
        &mut shouting,
        b"*3\r\n$9\r\nsubscribe\r\n$5\r\nUSAGE\r\n:1\r\n",
    )
    .await;
    expect(
        &mut shouting,
        &message("USAGE", r#"{"support_refresh":true}"#),
    )
    .await;
    let stats = cpa.stats();
    assert_eq!((stats.usage_subscribers, stats.error_subscribers), (2, 1));
}

#[tokio::test]
async fn a_subscriber_gets_the_records_and_the_queue_does_not() {
    let cpa = start().await;
    let mut sub = subscribed_usage(&cpa).await;
    cpa.push_raw(r#"{"n":1}"#);
    cpa.push(&json!({"n": 2}));
    cpa.push_raw("not json");
    for payload in [r#"{"n":1}"#, r#"{"n":2}"#, "not json"] {
        expect(&mut sub, &message("usage", payload)).await;
    }
    let mut popper = authed(&cpa).await;
    send(&mut popper, &["LPOP", "usage", "10"]).await;
    expect(&mut popper, b"*0\r\n").await;
    let stats = cpa.stats();
    assert_eq!(
        (stats.pushed, stats.published, stats.delivered, stats.queued),
        (3, 3, 3, 0)
    );
    eventually(|| cpa.stats().written == 3).await;
}

#[tokio::test]
async fn two_subscribers_both_get_every_record() {
    let cpa = start().await;
    let mut a = subscribed_usage(&cpa).await;
    let mut b = subscribed_usage(&cpa).await;
    for n in 0..5 {
        cpa.push(&json!({ "n": n }));
    }
    for n in 0..5 {
        let want = message("usage", &json!({ "n": n }).to_string());
        expect(&mut a, &want).await;
        expect(&mut b, &want).await;
    }
    let stats = cpa.stats();
    assert_eq!((stats.published, stats.delivered, stats.queued), (5, 10, 0));
}

#[tokio::test]
async fn the_queue_fills_again_when_the_last_subscriber_leaves() {
    let cpa = start().await;
    let mut a = subscribed_usage(&cpa).await;
    let mut b = subscribed_usage(&cpa).await;
    send(&mut a, &["UNSUBSCRIBE"]).await;
    expect(&mut a, UNSUBSCRIBED_USAGE).await;
    assert!(
        until_eof(&mut a).await.is_empty(),
        "closed after UNSUBSCRIBE"
    );
    eventually(|| cpa.stats().usage_subscribers == 1).await;
    cpa.push_raw("1");
    expect(&mut b, &message("usage", "1")).await;
    assert_eq!(
        cpa.stats().queued,
        0,
        "one subscriber left: still published"
    );
    drop(b);
    eventually(|| cpa.stats().usage_subscribers == 0).await;
    cpa.push_raw("2");
    let stats = cpa.stats();
    assert_eq!((stats.pushed, stats.published, stats.queued), (2, 1, 1));
    let mut popper = authed(&cpa).await;
    send(&mut popper, &["LPOP", "usage"]).await;
    expect(&mut popper, b"$1\r\n2\r\n").await;
}

/// A record of about 32 KiB, so that socket buffers fill in a few hundred records.
fn big(n: usize) -> String {
    json!({ "n": n, "pad": "x".repeat(32 * 1024) }).to_string()
}

/// Subscribes with a small receive buffer and never reads, then pushes records until the fake
/// drops the subscriber (its 256-message buffer full). Returns it, the records that came before
/// the drop, and the index of the record that dropped it.
async fn drop_a_stalled_subscriber(cpa: &FakeCpa) -> (TcpStream, usize) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut s = socket
        .connect(addr(cpa).parse().expect("addr"))
        .await
        .expect("connect");
    send(&mut s, &["AUTH", KEY]).await;
    expect(&mut s, b"+OK\r\n").await;
    send(&mut s, &["SUBSCRIBE", "usage"]).await;
    expect(&mut s, SUBSCRIBED_USAGE).await;
    for n in 0..20_000 {
        cpa.push_raw(&big(n));
        if cpa.stats().subscribers_dropped == 1 {
            return (s, n);
        }
        // Lets the connection write what the socket takes, as CPA's writer would.
        tokio::task::yield_now().await;
    }
    panic!("never dropped");
}

fn received(stream: &[u8]) -> Vec<usize> {
    let text = String::from_utf8_lossy(stream);
    text.split("*3\r\n$7\r\nmessage\r\n$5\r\nusage\r\n")
        .skip(1)
        .filter_map(|frame| {
            let json = frame.split("\r\n").nth(1)?;
            serde_json::from_str::<Value>(json).ok()?["n"].as_u64()
        })
        .map(|n| n as usize)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_subscriber_is_dropped_and_its_record_is_gone() {
    let cpa = start().await;
    let (mut stalled, dropped_at) = drop_a_stalled_subscriber(&cpa).await;
    assert!(dropped_at >= 255, "at least the buffer: {dropped_at}");
    let stats = cpa.stats();
    assert_eq!(stats.usage_subscribers, 0);
    assert_eq!(
        (stats.lost, stats.queued),
        (1, 0),
        "neither sent nor queued"
    );
    cpa.push_raw(&big(dropped_at + 1));
    assert_eq!(cpa.stats().queued, 1, "no subscriber left: queued");
    // The connection stays open until its buffer is written out, then closes.
    let got = received(&until_eof(&mut stalled).await);
    assert_eq!(got, (0..dropped_at).collect::<Vec<_>>());
    let stats = cpa.stats();
    assert_eq!(stats.delivered, dropped_at as u64);
    assert_eq!(stats.written, stats.delivered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_loses_the_record_only_for_the_full_subscriber() {
    let cpa = start().await;
    let mut fast = subscribed_usage(&cpa).await;
    let reader = tokio::spawn(async move { until_eof_slow(&mut fast).await });
    let (mut stalled, dropped_at) = drop_a_stalled_subscriber(&cpa).await;
    cpa.push_raw(&big(dropped_at + 1));
    let stats = cpa.stats();
    assert_eq!((stats.lost, stats.queued), (0, 0), "the other one had it");
    assert_eq!(received(&until_eof(&mut stalled).await).len(), dropped_at);
    eventually(|| {
        let stats = cpa.stats();
        stats.written == stats.delivered
    })
    .await;
    cpa.shutdown();
    let fast_got = received(&reader.await.expect("reader"));
    assert_eq!(fast_got, (0..dropped_at + 2).collect::<Vec<_>>());
}

/// Reads until EOF without a deadline (the fake closes at shutdown).
async fn until_eof_slow(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all).await;
    all
}

#[tokio::test]
async fn control_payloads_are_published_on_credential_changes() {
    let cpa = start().await;
    cpa.refresh();
    assert_eq!(cpa.stats().refreshes, 0, "nobody to tell");
    let mut usage = subscribed_usage(&cpa).await;
    let mut errors = subscribed_errors(&cpa).await;
    cpa.set_credentials(vec![SimCredential::new("codex", INDEX, "a@example.com")]);
    expect(&mut usage, &message("usage", r#"{"refresh":true}"#)).await;
    cpa.refresh();
    expect(&mut usage, &message("usage", r#"{"refresh":true}"#)).await;
    quiet(&mut errors).await;
    let stats = cpa.stats();
    assert_eq!((stats.refreshes, stats.published, stats.queued), (2, 0, 0));
}

fn failed_record(index: &str, status: u16, body: &str) -> Value {
    json!({
        "timestamp": "2026-12-07T21:22:08.114445816Z", "auth_index": index,
        "failed": true, "fail": { "status_code": status, "body": body },
        "provider": "codex", "model": "gpt-5", "request_id": "3ddebe62",
    })
}

#[tokio::test]
async fn failed_records_are_events_on_errors_and_never_queued() {
    let cpa = start().await;
    let mut c = SimCredential::new("codex", INDEX, "alice@example.com");
    c.unavailable = true;
    c.next_retry_after = Some("2026-12-07T21:22:09.1142999Z".to_owned());
    c.quota = Some(SimQuota {
        exceeded: true,
        reason: "quota".to_owned(),
        next_recover_at: c.next_retry_after.clone(),
        backoff_level: 1,
    });
    cpa.set_credentials(vec![c]);
    let mut errors = subscribed_errors(&cpa).await;
    cpa.push(&failed_record(INDEX, 429, r#"{"error":"slow down"}"#));
    let event = concat!(
        r#"{"timestamp":"2026-12-07T21:22:08.114445816Z","provider":"codex","model":"gpt-5","#,
        r#""auth_id":"codex-alice@example.com.json","auth_index":"57b8ed21a304e3d0","#,
        r#""status_code":429,"body":"{\"error\":\"slow down\"}","auth_status":{"status":"active","#,
        r#""disabled":false,"unavailable":true,"next_retry_after":"2026-12-07T21:22:09.1142999Z","#,
        r#""quota":{"exceeded":true,"reason":"quota","next_recover_at":"2026-12-07T21:22:09.1142999Z","backoff_level":1},"#,
        r#""model":{"name":"gpt-5","status":"error","status_message":"{\"error\":\"slow down\"}","#,
        r#""unavailable":true,"next_retry_after":"2026-12-07T21:22:09.1142999Z","#,
        r#""quota":{"exceeded":true,"reason":"quota","next_recover_at":"2026-12-07T21:22:09.1142999Z","backoff_level":1}}}}"#
    );
    expect(&mut errors, &message("errors", event)).await;
    cpa.push(&json!({"failed": false, "auth_index": INDEX}));
    quiet(&mut errors).await;
    cpa.push_error_raw(r#"{"hand":"made"}"#);
    expect(&mut errors, &message("errors", r#"{"hand":"made"}"#)).await;
    let stats = cpa.stats();
    assert_eq!((stats.error_events, stats.error_delivered), (2, 2));
    assert_eq!(
        stats.queued, 2,
        "the usage records are queued, the events are not"
    );
    // An unlisted credential: a file-like auth id.
    cpa.push(&failed_record("ffff", 500, "boom"));
    let mut got = vec![0u8; 64];
    let n = tokio::time::timeout(WAIT, errors.read(&mut got))
        .await
        .expect("in time")
        .expect("read");
    assert!(
        String::from_utf8_lossy(&got[..n]).starts_with("*3\r\n$7\r\nmessage\r\n$6\r\nerrors\r\n")
    );
}

#[tokio::test]
async fn errors_flow_without_usage_statistics_but_not_without_management() {
    let cpa = start().await;
    let mut errors = subscribed_errors(&cpa).await;
    cpa.set_usage_statistics_enabled(false);
    cpa.push(&failed_record(INDEX, 500, "boom"));
    let stats = cpa.stats();
    assert_eq!((stats.error_events, stats.pushed), (1, 0));
    cpa.set_management_key("");
    assert!(
        !until_eof(&mut errors).await.is_empty(),
        "it writes out the event it had, then closes"
    );
    cpa.push_error_raw("{}");
    assert_eq!(cpa.stats().error_events, 1);
}

#[tokio::test]
async fn switching_management_off_ends_usage_subscriptions() {
    let cpa = start().await;
    let mut sub = subscribed_usage(&cpa).await;
    cpa.set_management_key("");
    assert!(until_eof(&mut sub).await.is_empty());
    assert_eq!(cpa.stats().usage_subscribers, 0);
}

#[tokio::test]
async fn a_subscription_accepts_only_ping_unsubscribe_and_quit() {
    let cpa = start().await;
    let mut sub = subscribed_usage(&cpa).await;
    for (command, reply) in [
        (&["PING"][..], &b"*2\r\n$4\r\npong\r\n$-1\r\n"[..]),
        (&["ping", "hi"], b"*2\r\n$4\r\npong\r\n$2\r\nhi\r\n"),
        (&["PING", "a", "b"], b"*2\r\n$4\r\npong\r\n$1\r\na\r\n"),
        (&["LPOP", "usage"], b"-ERR unknown command 'lpop'\r\n"),
        (
            &["SUBSCRIBE", "errors"],
            b"-ERR unknown command 'subscribe'\r\n",
        ),
        (&["AUTH", KEY], b"-ERR unknown command 'auth'\r\n"),
        (&[], b"-ERR empty command\r\n"),
    ] {
        send(&mut sub, command).await;
        expect(&mut sub, reply).await;
    }
    send(&mut sub, &["UNSUBSCRIBE", "errors"]).await;
    expect(&mut sub, UNSUBSCRIBED_USAGE).await;
    assert!(until_eof(&mut sub).await.is_empty());

    let mut errors = subscribed_errors(&cpa).await;
    send(&mut errors, &["unsubscribe"]).await;
    expect(
        &mut errors,
        b"*3\r\n$11\r\nunsubscribe\r\n$6\r\nerrors\r\n:0\r\n",
    )
    .await;
    assert!(until_eof(&mut errors).await.is_empty());

    let mut quitter = subscribed_usage(&cpa).await;
    send(&mut quitter, &["QUIT", "now"]).await;
    expect(&mut quitter, b"+OK\r\n").await;
    assert!(until_eof(&mut quitter).await.is_empty());

    let mut garbled = subscribed_usage(&cpa).await;
    garbled.write_all(b"GARBAGE\r\n").await.expect("write");
    expect(&mut garbled, b"-ERR protocol error\r\n").await;
    assert!(until_eof(&mut garbled).await.is_empty());
    eventually(|| cpa.stats().usage_subscribers + cpa.stats().error_subscribers == 0).await;
}

#[tokio::test]
async fn outside_a_subscription_the_pubsub_commands_are_checked() {
    let cpa = start().await;
    let mut anon = TcpStream::connect(addr(&cpa)).await.expect("connect");
    send(&mut anon, &["SUBSCRIBE", "usage"]).await;
    expect(&mut anon, b"-NOAUTH Authentication required.\r\n").await;
    let mut s = authed(&cpa).await;
    for (command, reply) in [
        (&["PING"][..], &b"-ERR unknown command 'ping'\r\n"[..]),
        (&["QUIT"], b"-ERR unknown command 'quit'\r\n"),
        (&["UNSUBSCRIBE"], b"-ERR unknown command 'unsubscribe'\r\n"),
        (&["SUBSCRIBE", "foo"], b"-ERR unsupported channel 'foo'\r\n"),
        (
            &["SUBSCRIBE"],
            b"-ERR wrong number of arguments for 'subscribe' command\r\n",
        ),
        (
            &["SUBSCRIBE", "usage", "errors"],
            b"-ERR wrong number of arguments for 'subscribe' command\r\n",
        ),
        (
            &["LPOP", "errors"],
            b"-ERR unsupported channel 'errors'\r\n",
        ),
    ] {
        send(&mut s, command).await;
        expect(&mut s, reply).await;
    }
    // Pipelined right behind SUBSCRIBE, a PING is answered on the subscription.
    let mut both = cmd(&["SUBSCRIBE", "usage"]);
    both.extend_from_slice(&cmd(&["PING"]));
    s.write_all(&both).await.expect("write");
    expect(&mut s, SUBSCRIBED_USAGE).await;
    expect(&mut s, b"*2\r\n$4\r\npong\r\n$-1\r\n").await;
}
