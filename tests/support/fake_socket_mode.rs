//! A fake of Slack's Socket Mode, written from Slack's protocol description
//! ("Using Socket Mode"): `apps.connections.open` on a [`FakeSlack`] (it
//! checks the `xapp-` app token) hands out a single-use loopback `ws://` URL;
//! each connection is greeted with `hello`; envelopes (`slash_commands`,
//! `interactive`) go to one live connection; every delivery must be
//! acknowledged with its `envelope_id` within 3 s. It can ask for a refresh
//! (`disconnect`), drop a socket without a word, and lose an ack so that the
//! envelope is redelivered with `retry_attempt` raised, as Slack does.

use super::fake_slack::FakeSlack;
use super::net::{eventually, Recorder};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::Message;

/// Slack's limit for an acknowledgement, network included.
pub const ACK_WITHIN: Duration = Duration::from_secs(3);
/// The app id in `hello` and in interaction payloads.
pub const APP_ID: &str = "A0JITBOT";

/// One `apps.connections.open` call.
#[derive(Clone, Debug)]
pub struct Open {
    pub at: Instant,
    /// False when the token was wrong or the fake was told to fail it.
    pub granted: bool,
}

/// One envelope delivery (a redelivery is a delivery of its own).
#[derive(Clone, Debug)]
pub struct Delivery {
    pub envelope_id: String,
    pub kind: String,
    pub retry_attempt: u32,
    pub accepts_response_payload: bool,
    pub connection: u64,
    pub at: Instant,
}

/// One acknowledgement received.
#[derive(Clone, Debug)]
pub struct Ack {
    pub envelope_id: String,
    pub payload: Option<Value>,
    pub connection: u64,
    pub at: Instant,
    /// Dropped on purpose by [`FakeSocketMode::deliver_losing_ack`].
    pub lost: bool,
}

enum Out {
    Text(String),
    /// A close frame, then the socket is closed.
    Close,
    /// The TCP connection is dropped without a close frame.
    Drop,
}

struct Conn {
    id: u64,
    tx: mpsc::UnboundedSender<Out>,
}

struct Inner {
    app_token: String,
    ws_base: String,
    tickets: Mutex<HashSet<String>>,
    next: AtomicU64,
    fail_opens: AtomicU32,
    live: Mutex<Vec<Conn>>,
    accepted: AtomicU64,
    /// Connection attempts refused: unknown or already used ticket.
    refused: AtomicU64,
    /// Envelope ids whose next ack is to be "lost".
    lose: Mutex<HashSet<String>>,
    opens: Recorder<Open>,
    deliveries: Recorder<Delivery>,
    acks: Recorder<Ack>,
    /// Every text frame a client sent that was not an ack.
    other_frames: Recorder<String>,
}

/// Handle on a running fake; cheap to clone.
#[derive(Clone)]
pub struct FakeSocketMode {
    inner: Arc<Inner>,
    /// The Web API side (chat.postMessage, ...), shared with Socket Mode.
    pub slack: FakeSlack,
}

impl FakeSocketMode {
    /// Starts the WebSocket side and teaches `slack` to answer
    /// `apps.connections.open` for `app_token`.
    pub async fn start(slack: FakeSlack, app_token: &str) -> FakeSocketMode {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake socket mode");
        let addr = listener.local_addr().expect("local addr");
        let inner = Arc::new(Inner {
            app_token: app_token.to_string(),
            ws_base: format!("ws://{addr}"),
            tickets: Mutex::default(),
            next: AtomicU64::new(1),
            fail_opens: AtomicU32::new(0),
            live: Mutex::default(),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            lose: Mutex::default(),
            opens: Recorder::default(),
            deliveries: Recorder::default(),
            acks: Recorder::default(),
            other_frames: Recorder::default(),
        });
        let fake = FakeSocketMode { inner, slack };
        let on_open = fake.inner.clone();
        fake.slack
            .answer_with("apps.connections.open", move |call| open(&on_open, call));
        let accepting = fake.inner.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(serve_connection(accepting.clone(), tcp));
            }
        });
        fake
    }

    /// The next `n` calls of `apps.connections.open` fail (`internal_error`).
    pub fn fail_next_opens(&self, n: u32) {
        self.inner.fail_opens.store(n, Ordering::SeqCst);
    }

    pub fn opens(&self) -> Vec<Open> {
        self.inner.opens.all()
    }

    /// Ids of the connections open now, oldest first.
    pub fn live(&self) -> Vec<u64> {
        self.inner.live.lock().unwrap().iter().map(|c| c.id).collect()
    }

    /// WebSocket connections accepted so far (each with a fresh ticket).
    pub fn accepted(&self) -> u64 {
        self.inner.accepted.load(Ordering::SeqCst)
    }

    /// Connection attempts with an unknown or reused ticket.
    pub fn refused(&self) -> u64 {
        self.inner.refused.load(Ordering::SeqCst)
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.inner.deliveries.all()
    }

    pub fn acks(&self) -> Vec<Ack> {
        self.inner.acks.all()
    }

    /// Frames from the client that were neither acks nor valid JSON acks.
    pub fn other_frames(&self) -> Vec<String> {
        self.inner.other_frames.all()
    }

    /// Waits until at least `n` connections are live; returns the newest.
    pub async fn wait_live(&self, n: usize) -> u64 {
        eventually(
            Duration::from_secs(20),
            &format!("{n} live Socket Mode connection(s)"),
            || {
                let live = self.live();
                (live.len() >= n).then(|| *live.last().expect("one"))
            },
        )
        .await
    }

    /// Waits until a connection other than those in `old` is live.
    pub async fn wait_new_connection(&self, old: &[u64], within: Duration) -> u64 {
        eventually(within, "a new Socket Mode connection", || {
            self.live().into_iter().rev().find(|id| !old.contains(id))
        })
        .await
    }

    /// Delivers an envelope to the newest live connection; returns its id.
    pub async fn deliver(&self, kind: &str, payload: Value, accepts_response_payload: bool) -> String {
        let id = format!("env-{}", self.inner.next.fetch_add(1, Ordering::SeqCst));
        self.send_envelope(&id, kind, payload, accepts_response_payload, 0)
            .await;
        id
    }

    /// A slash command `/jit <text>` from `user` in `channel`.
    pub async fn slash(&self, user: &str, channel: &str, text: &str) -> String {
        let n = self.inner.next.fetch_add(1, Ordering::SeqCst);
        self.deliver(
            "slash_commands",
            slash_payload(&self.slack, user, channel, text, n),
            true,
        )
        .await
    }

    /// A click on the button `action_id` of the message `message_ts`.
    pub async fn click(&self, user: &str, channel: &str, message_ts: &str, action_id: &str) -> String {
        let n = self.inner.next.fetch_add(1, Ordering::SeqCst);
        let payload = block_actions_payload(&self.slack, user, channel, message_ts, action_id, n);
        self.deliver("interactive", payload, false).await
    }

    /// Delivers an envelope, drops its acknowledgement as if it never
    /// reached Slack, and delivers it again with `retry_attempt` 1 and
    /// `retry_reason` `timeout`. Returns the envelope id.
    pub async fn deliver_losing_ack(
        &self,
        kind: &str,
        payload: Value,
        accepts_response_payload: bool,
    ) -> String {
        let id = format!("env-{}", self.inner.next.fetch_add(1, Ordering::SeqCst));
        self.inner.lose.lock().unwrap().insert(id.clone());
        self.send_envelope(&id, kind, payload.clone(), accepts_response_payload, 0)
            .await;
        self.inner
            .acks
            .wait_for(ACK_WITHIN, "the ack that is to be lost", |a| {
                a.envelope_id == id && a.lost
            })
            .await;
        self.send_envelope(&id, kind, payload, accepts_response_payload, 1)
            .await;
        id
    }

    async fn send_envelope(&self, id: &str, kind: &str, payload: Value, accepts: bool, retry_attempt: u32) {
        let conn = self.wait_live(1).await;
        let mut envelope = json!({
            "envelope_id": id,
            "type": kind,
            "payload": payload,
            "accepts_response_payload": accepts,
            "retry_attempt": retry_attempt,
            "retry_reason": if retry_attempt == 0 { "" } else { "timeout" },
        });
        if kind == "events_api" {
            envelope["retry_reason"] = json!(null);
        }
        self.inner.deliveries.push(Delivery {
            envelope_id: id.to_string(),
            kind: kind.to_string(),
            retry_attempt,
            accepts_response_payload: accepts,
            connection: conn,
            at: Instant::now(),
        });
        self.send_to(conn, Out::Text(envelope.to_string()));
    }

    /// The acknowledgement of the latest delivery of `envelope_id`; panics
    /// unless it arrives within 3 s of that delivery.
    pub async fn ack(&self, envelope_id: &str) -> Ack {
        let delivered = self
            .inner
            .deliveries
            .matching(|d| d.envelope_id == envelope_id)
            .pop()
            .unwrap_or_else(|| panic!("{envelope_id} was never delivered"));
        let ack = self
            .inner
            .acks
            .wait_for(ACK_WITHIN, &format!("the ack of {envelope_id}"), |a| {
                a.envelope_id == envelope_id && a.at >= delivered.at && !a.lost
            })
            .await;
        let took = ack.at - delivered.at;
        assert!(took <= ACK_WITHIN, "{envelope_id} acknowledged after {took:?}");
        ack
    }

    /// Checks that every delivery so far was acknowledged within 3 s, on the
    /// connection it went to, and that nothing else came back; returns how
    /// many deliveries there were.
    pub fn assert_all_acked(&self) -> usize {
        let acks = self.acks();
        let deliveries = self.deliveries();
        for d in &deliveries {
            let ack = acks
                .iter()
                .find(|a| a.envelope_id == d.envelope_id && a.at >= d.at && a.connection == d.connection);
            let ack = ack.unwrap_or_else(|| panic!("no ack for {d:?}"));
            assert!(ack.at - d.at <= ACK_WITHIN, "late ack for {d:?}: {ack:?}");
            if !d.accepts_response_payload {
                assert!(ack.payload.is_none(), "a payload where Slack takes none: {ack:?}");
            }
        }
        assert!(
            self.other_frames().is_empty(),
            "frames that are no acks: {:?}",
            self.other_frames()
        );
        deliveries.len()
    }

    /// Sends `disconnect` with `reason` to connection `conn`, then closes it
    /// after `grace`, as Slack does when it rotates a connection.
    pub async fn disconnect(&self, conn: u64, reason: &str, grace: Duration) {
        let frame = json!({
            "type": "disconnect",
            "reason": reason,
            "debug_info": {"host": "applink-fake"}
        });
        self.send_to(conn, Out::Text(frame.to_string()));
        tokio::time::sleep(grace).await;
        // The client may have closed it already, which is what Slack wants.
        self.try_send(conn, Out::Close);
    }

    /// Drops connection `conn`'s TCP socket without a close frame.
    pub fn drop_socket(&self, conn: u64) {
        self.send_to(conn, Out::Drop);
    }

    fn send_to(&self, conn: u64, out: Out) {
        assert!(self.try_send(conn, out), "connection {conn} is not live");
    }

    fn try_send(&self, conn: u64, out: Out) -> bool {
        let live = self.inner.live.lock().unwrap();
        live.iter()
            .find(|c| c.id == conn)
            .is_some_and(|c| c.tx.send(out).is_ok())
    }
}

/// `apps.connections.open`: app token checked, one fresh ticket per call.
fn open(inner: &Arc<Inner>, call: &super::fake_slack::Call) -> Value {
    let authorized = call.authorization.as_deref() == Some(&format!("Bearer {}", inner.app_token));
    let failing = inner
        .fail_opens
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    inner.opens.push(Open {
        at: Instant::now(),
        granted: authorized && !failing,
    });
    if !authorized {
        return json!({"ok": false, "error": "invalid_auth"});
    }
    if failing {
        return json!({"ok": false, "error": "internal_error"});
    }
    let ticket = format!("ticket-{}", inner.next.fetch_add(1, Ordering::SeqCst));
    inner.tickets.lock().unwrap().insert(ticket.clone());
    json!({"ok": true, "url": format!("{}/link/?ticket={ticket}&app_id={APP_ID}", inner.ws_base)})
}

async fn serve_connection(inner: Arc<Inner>, tcp: tokio::net::TcpStream) {
    let check = inner.clone();
    let accepted = tokio_tungstenite::accept_hdr_async(tcp, move |req: &Request, resp: Response| {
        let ticket = req
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .find_map(|kv| kv.strip_prefix("ticket="))
            .unwrap_or_default()
            .to_string();
        if req.uri().path().starts_with("/link") && check.tickets.lock().unwrap().remove(&ticket) {
            Ok(resp)
        } else {
            check.refused.fetch_add(1, Ordering::SeqCst);
            let mut refusal = ErrorResponse::new(Some("unknown or used ticket".into()));
            *refusal.status_mut() = StatusCode::UNAUTHORIZED;
            Err(refusal)
        }
    })
    .await;
    let Ok(ws) = accepted else { return };
    let id = inner.accepted.fetch_add(1, Ordering::SeqCst) + 1;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (mut sink, mut stream) = ws.split();
    let count = {
        let mut live = inner.live.lock().unwrap();
        live.push(Conn { id, tx });
        live.len()
    };
    let hello = json!({
        "type": "hello",
        "num_connections": count,
        "debug_info": {"host": "applink-fake", "build_number": 1, "approximate_connection_time": 18060},
        "connection_info": {"app_id": APP_ID}
    });
    if sink.send(Message::Text(hello.to_string().into())).await.is_err() {
        inner.live.lock().unwrap().retain(|c| c.id != id);
        return;
    }
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(Out::Text(text)) => {
                    if sink.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                }
                Some(Out::Close) => {
                    let _ = sink.send(Message::Close(None)).await;
                    break;
                }
                Some(Out::Drop) | None => break,
            },
            frame = stream.next() => match frame {
                Some(Ok(Message::Text(text))) => received(&inner, id, text.as_str()),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    inner.live.lock().unwrap().retain(|c| c.id != id);
    // Dropping both halves closes the TCP connection.
}

fn received(inner: &Inner, conn: u64, text: &str) {
    let parsed: Option<Value> = serde_json::from_str(text).ok();
    let Some(envelope_id) = parsed
        .as_ref()
        .and_then(|v| v.get("envelope_id"))
        .and_then(Value::as_str)
    else {
        inner.other_frames.push(text.to_string());
        return;
    };
    let lost = inner.lose.lock().unwrap().remove(envelope_id);
    inner.acks.push(Ack {
        envelope_id: envelope_id.to_string(),
        payload: parsed.as_ref().and_then(|v| v.get("payload")).cloned(),
        connection: conn,
        at: Instant::now(),
        lost,
    });
}

/// A `slash_commands` payload as Slack sends it.
pub fn slash_payload(slack: &FakeSlack, user: &str, channel: &str, text: &str, n: u64) -> Value {
    json!({
        "token": "deprecated-verification-token",
        "team_id": "T1",
        "team_domain": "example",
        "channel_id": channel,
        "channel_name": "jit",
        "user_id": user,
        "user_name": user.to_lowercase(),
        "command": "/jit",
        "text": text,
        "api_app_id": APP_ID,
        "is_enterprise_install": "false",
        "response_url": slack.response_url(n as u32),
        "trigger_id": format!("{n}.1.trigger"),
    })
}

/// A `block_actions` payload for a button on a message in `channel`.
pub fn block_actions_payload(
    slack: &FakeSlack,
    user: &str,
    channel: &str,
    message_ts: &str,
    action_id: &str,
    n: u64,
) -> Value {
    json!({
        "type": "block_actions",
        "team": {"id": "T1", "domain": "example"},
        "user": {"id": user, "username": user.to_lowercase(), "team_id": "T1"},
        "api_app_id": APP_ID,
        "token": "deprecated-verification-token",
        "container": {"type": "message", "message_ts": message_ts, "channel_id": channel, "is_ephemeral": false},
        "trigger_id": format!("{n}.2.trigger"),
        "channel": {"id": channel, "name": "jit"},
        "response_url": slack.response_url(n as u32),
        "actions": [{
            "type": "button",
            "action_id": action_id,
            "block_id": "decide",
            "text": {"type": "plain_text", "text": "Click", "emoji": true},
            "action_ts": format!("1700000{n:03}.000100")
        }]
    })
}
