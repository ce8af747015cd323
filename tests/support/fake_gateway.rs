//! A fake of Discord's gateway v10, written from discord-api-docs
//! ("Gateway"): [`FakeDiscord`] answers `GET /gateway/bot` with this fake's
//! loopback `ws://` URL; every connection gets op 10 HELLO; op 2 IDENTIFY
//! opens a session (op 0 READY), op 6 RESUME replays what the session
//! missed and ends with RESUMED; op 1 heartbeats get op 11 ACKs unless told
//! to withhold them; `INTERACTION_CREATE` goes out as op 0 dispatches with
//! a sequence number; op 7 RECONNECT and op 9 INVALID_SESSION on demand.
//! Interaction answers go to the REST fake
//! (`POST /interactions/{id}/{token}/callback`).

use super::fake_discord::{self, FakeDiscord, APP_ID, BOT_USER};
use super::net::{eventually, Recorder};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;

/// The guild the interactions come from.
pub const GUILD: &str = "700000000000000001";

/// A frame a client sent.
#[derive(Clone, Debug)]
pub struct Frame {
    pub connection: u64,
    pub op: u64,
    pub d: Value,
}

/// A WebSocket connection a client opened.
#[derive(Clone, Debug)]
pub struct Connect {
    /// The query of the URL it connected to (`v=10...`).
    pub query: String,
}

enum Out {
    Text(String),
    Close,
}

struct Conn {
    id: u64,
    tx: mpsc::UnboundedSender<Out>,
    session: Option<String>,
}

#[derive(Default)]
struct Session {
    seq: u64,
    /// Every dispatch of the session, for RESUME to replay.
    events: Vec<(u64, Value)>,
}

struct Inner {
    ws_base: String,
    heartbeat_ms: u64,
    next: AtomicU64,
    invalidate_next_resume: AtomicBool,
    /// Connections whose heartbeats get no ACK.
    withhold: Mutex<HashSet<u64>>,
    live: Mutex<Vec<Conn>>,
    sessions: Mutex<HashMap<String, Session>>,
    /// The session dispatches go to: the last one identified or resumed.
    current: Mutex<Option<String>>,
    frames: Recorder<Frame>,
    connects: Recorder<Connect>,
}

/// Handle on a running fake; cheap to clone.
#[derive(Clone)]
pub struct FakeGateway {
    inner: Arc<Inner>,
    /// The REST side: `/gateway/bot`, messages, interaction callbacks.
    pub discord: FakeDiscord,
}

impl FakeGateway {
    /// Starts the gateway with a heartbeat interval of `heartbeat`, and
    /// points `discord`'s `GET /gateway/bot` at it.
    pub async fn start(discord: FakeDiscord, heartbeat: Duration) -> FakeGateway {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake gateway");
        let addr = listener.local_addr().expect("local addr");
        let inner = Arc::new(Inner {
            ws_base: format!("ws://{addr}"),
            heartbeat_ms: heartbeat.as_millis() as u64,
            next: AtomicU64::new(1),
            invalidate_next_resume: AtomicBool::new(false),
            withhold: Mutex::default(),
            live: Mutex::default(),
            sessions: Mutex::default(),
            current: Mutex::default(),
            frames: Recorder::default(),
            connects: Recorder::default(),
        });
        discord.set_gateway_url(&inner.ws_base);
        let accepting = inner.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(serve_connection(accepting.clone(), tcp));
            }
        });
        FakeGateway { inner, discord }
    }

    pub fn frames(&self) -> Vec<Frame> {
        self.inner.frames.all()
    }

    /// Frames with opcode `op`.
    pub fn ops(&self, op: u64) -> Vec<Frame> {
        self.inner.frames.matching(|f| f.op == op)
    }

    pub fn connects(&self) -> Vec<Connect> {
        self.inner.connects.all()
    }

    /// Ids of the connections open now, oldest first.
    pub fn live(&self) -> Vec<u64> {
        self.inner.live.lock().unwrap().iter().map(|c| c.id).collect()
    }

    /// Waits for the `n`-th frame with opcode `op`.
    pub async fn wait_op(&self, op: u64, n: usize, within: Duration) -> Frame {
        eventually(within, &format!("frame #{n} with op {op}"), || {
            self.ops(op).get(n - 1).cloned()
        })
        .await
    }

    /// The connection that holds the current session.
    pub async fn session_connection(&self) -> u64 {
        eventually(Duration::from_secs(20), "a connection with a session", || {
            let current = self.inner.current.lock().unwrap().clone()?;
            let live = self.inner.live.lock().unwrap();
            live.iter()
                .find(|c| c.session.as_ref() == Some(&current))
                .map(|c| c.id)
        })
        .await
    }

    /// Stops acknowledging heartbeats on connection `conn`.
    pub fn withhold_acks(&self, conn: u64) {
        self.inner.withhold.lock().unwrap().insert(conn);
    }

    /// The next RESUME is answered with op 9 INVALID_SESSION (not resumable).
    pub fn invalidate_next_resume(&self) {
        self.inner.invalidate_next_resume.store(true, Ordering::SeqCst);
    }

    /// Sends op 7 RECONNECT on `conn` and closes it, as Discord does; waits
    /// until it is gone.
    pub async fn reconnect(&self, conn: u64) {
        self.send_to(
            conn,
            Out::Text(json!({"op": 7, "d": null, "s": null, "t": null}).to_string()),
        );
        self.send_to(conn, Out::Close);
        eventually(Duration::from_secs(5), "the old connection closed", || {
            (!self.live().contains(&conn)).then_some(())
        })
        .await;
    }

    /// Dispatches `INTERACTION_CREATE` in the current session (sent at once
    /// when that session's connection is up, else replayed on RESUME).
    pub fn dispatch_interaction(&self, interaction: &Value) {
        let mut sessions = self.inner.sessions.lock().unwrap();
        let current = self.inner.current.lock().unwrap().clone();
        let session = current.expect("no session: nobody identified yet");
        dispatch(
            &self.inner,
            &mut sessions,
            &session,
            "INTERACTION_CREATE",
            interaction.clone(),
        );
    }

    /// What the fake saw of the client's connections and sessions, for a
    /// failure message.
    pub fn describe(&self) -> String {
        let live: Vec<(u64, Option<String>)> = {
            let live = self.inner.live.lock().unwrap();
            live.iter().map(|c| (c.id, c.session.clone())).collect()
        };
        let sessions: Vec<(String, u64)> = {
            let sessions = self.inner.sessions.lock().unwrap();
            sessions.iter().map(|(k, v)| (k.clone(), v.seq)).collect()
        };
        format!(
            "gateway fake: {} connections opened, {} IDENTIFY, {} RESUME; live (connection, session): {live:?}; current session {:?}; sessions (name, last seq): {sessions:?}",
            self.connects().len(),
            self.ops(2).len(),
            self.ops(6).len(),
            self.inner.current.lock().unwrap(),
        )
    }

    /// A fresh interaction id and token.
    pub fn fresh(&self) -> (String, String) {
        let n = self.inner.next.fetch_add(1, Ordering::SeqCst);
        (format!("81000000000000{n:04}"), format!("gw-token-{n}"))
    }

    /// `/jit <sub> <options>` typed by Discord user `user` in `channel`.
    pub fn command(&self, user: &str, channel: &str, sub: &str, options: &[(&str, &str)]) -> Value {
        let options: Vec<Value> = options
            .iter()
            .map(|(k, v)| json!({"name": k, "type": 3, "value": v}))
            .collect();
        let data = json!({
            "id": "1400000000000000001", "name": "jit", "type": 1,
            "options": [{"name": sub, "type": 1, "options": options}]
        });
        self.interaction(2, user, channel, data, None)
    }

    /// A click on the button `custom_id` of message `message_id` in `channel`.
    pub fn button(&self, user: &str, channel: &str, message_id: &str, custom_id: &str) -> Value {
        let data = json!({"custom_id": custom_id, "component_type": 2});
        let message = fake_discord::message(message_id, channel, &json!({"content": ""}));
        self.interaction(3, user, channel, data, Some(message))
    }

    fn interaction(&self, kind: u8, user: &str, channel: &str, data: Value, message: Option<Value>) -> Value {
        let (id, token) = self.fresh();
        let mut v = json!({
            "id": id,
            "application_id": APP_ID,
            "type": kind,
            "data": data,
            "guild_id": GUILD,
            "channel": {"id": channel, "type": 0, "name": "jit", "guild_id": GUILD},
            "channel_id": channel,
            "member": {
                "user": fake_discord::user(user, &format!("user{}", &user[user.len() - 2..]), false),
                "roles": [], "joined_at": "2025-01-01T00:00:00.000000+00:00",
                "deaf": false, "mute": false, "flags": 0, "pending": false,
                "permissions": "2147483648", "nick": null, "avatar": null
            },
            "token": token,
            "version": 1,
            "app_permissions": "2147483648",
            "locale": "en-US",
            "guild_locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": {"0": GUILD},
            "context": 0,
            "attachment_size_limit": 10_485_760
        });
        if let Some(m) = message {
            v["message"] = m;
        }
        v
    }

    fn send_to(&self, conn: u64, out: Out) {
        let sent = {
            let live = self.inner.live.lock().unwrap();
            live.iter()
                .find(|c| c.id == conn)
                .is_some_and(|c| c.tx.send(out).is_ok())
        };
        assert!(sent, "gateway connection {conn} is not live");
    }
}

/// Numbers `d` in `session`, keeps it for RESUME, and sends it if the
/// session's connection is up. The caller holds the sessions lock: IDENTIFY and RESUME
/// hold it from attaching a connection until READY or the replay is queued,
/// so a dispatch made meanwhile comes after them on the new connection,
/// never before READY and never lost (lock order: sessions, then live).
fn dispatch(inner: &Inner, sessions: &mut HashMap<String, Session>, session: &str, t: &str, d: Value) {
    let s = sessions.entry(session.to_string()).or_default();
    s.seq += 1;
    let frame = json!({"op": 0, "s": s.seq, "t": t, "d": d});
    s.events.push((s.seq, frame.clone()));
    let live = inner.live.lock().unwrap();
    if let Some(c) = live.iter().find(|c| c.session.as_deref() == Some(session)) {
        let _ = c.tx.send(Out::Text(frame.to_string()));
    }
}

fn ready(inner: &Inner, session: &str) -> Value {
    json!({
        "v": 10,
        "user": fake_discord::user(BOT_USER, "jitbot", true),
        "guilds": [{"id": GUILD, "unavailable": true}],
        "session_id": session,
        "resume_gateway_url": inner.ws_base,
        "shard": [0, 1],
        "application": {"id": APP_ID, "flags": 0}
    })
}

async fn serve_connection(inner: Arc<Inner>, tcp: tokio::net::TcpStream) {
    let query = Arc::new(Mutex::new(String::new()));
    let seen = query.clone();
    let accepted = tokio_tungstenite::accept_hdr_async(tcp, move |req: &Request, resp: Response| {
        *seen.lock().unwrap() = req.uri().query().unwrap_or_default().to_string();
        Ok(resp)
    })
    .await;
    let Ok(ws) = accepted else { return };
    let id = inner.next.fetch_add(1, Ordering::SeqCst);
    inner.connects.push(Connect {
        query: query.lock().unwrap().clone(),
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    inner.live.lock().unwrap().push(Conn {
        id,
        tx,
        session: None,
    });
    let (mut sink, mut stream) = ws.split();
    let hello = json!({"op": 10, "d": {"heartbeat_interval": inner.heartbeat_ms}, "s": null, "t": null});
    let mut open = sink.send(Message::Text(hello.to_string().into())).await.is_ok();
    while open {
        tokio::select! {
            out = rx.recv() => match out {
                Some(Out::Text(text)) => open = sink.send(Message::Text(text.into())).await.is_ok(),
                Some(Out::Close) | None => {
                    let _ = sink.send(Message::Close(None)).await;
                    open = false;
                }
            },
            frame = stream.next() => match frame {
                Some(Ok(Message::Text(text))) => received(&inner, id, text.as_str()),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => open = false,
                Some(Ok(_)) => {}
            },
        }
    }
    inner.live.lock().unwrap().retain(|c| c.id != id);
}

fn send(inner: &Inner, conn: u64, frame: Value) {
    let live = inner.live.lock().unwrap();
    if let Some(c) = live.iter().find(|c| c.id == conn) {
        let _ = c.tx.send(Out::Text(frame.to_string()));
    }
}

fn attach(inner: &Inner, conn: u64, session: &str) {
    let mut live = inner.live.lock().unwrap();
    if let Some(c) = live.iter_mut().find(|c| c.id == conn) {
        c.session = Some(session.to_string());
    }
    *inner.current.lock().unwrap() = Some(session.to_string());
}

fn received(inner: &Inner, conn: u64, text: &str) {
    let frame: Value = serde_json::from_str(text).unwrap_or(json!({"op": 999, "d": text}));
    let op = frame["op"].as_u64().unwrap_or(999);
    let d = frame["d"].clone();
    inner.frames.push(Frame {
        connection: conn,
        op,
        d: d.clone(),
    });
    match op {
        1 if !inner.withhold.lock().unwrap().contains(&conn) => {
            send(inner, conn, json!({"op": 11, "d": null, "s": null, "t": null}));
        }
        2 => {
            let session = format!("session-{}", inner.next.fetch_add(1, Ordering::SeqCst));
            let mut sessions = inner.sessions.lock().unwrap();
            attach(inner, conn, &session);
            dispatch(inner, &mut sessions, &session, "READY", ready(inner, &session));
        }
        6 => {
            let session = d["session_id"].as_str().unwrap_or_default().to_string();
            let after = d["seq"].as_u64().unwrap_or(0);
            let known = inner.sessions.lock().unwrap().contains_key(&session);
            if inner.invalidate_next_resume.swap(false, Ordering::SeqCst) || !known {
                send(inner, conn, json!({"op": 9, "d": false, "s": null, "t": null}));
                return;
            }
            let mut sessions = inner.sessions.lock().unwrap();
            for (_, f) in sessions[&session].events.iter().filter(|(seq, _)| *seq > after) {
                send(inner, conn, f.clone());
            }
            attach(inner, conn, &session);
            dispatch(inner, &mut sessions, &session, "RESUMED", json!({}));
        }
        _ => {}
    }
}
