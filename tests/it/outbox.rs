//! Outbox delivery per destination (issue 12, defect 5): alerts are never
//! dropped, a rate-limited platform delays nobody else, a partial post is
//! retried only where it failed, engine wake-ups never bypass a backoff,
//! and a post interrupted by a crash is known.

use crate::support::bot::{Backend, TestBot};
use async_trait::async_trait;
use jitbot::chat::fanout::Fanout;
use jitbot::chat::outbox::{drain, MAX_ATTEMPTS};
use jitbot::chat::view::{ApprovalCard, Audience, MessageRef, Notice};
use jitbot::ports::{ChatError, Notifier};
use jitbot::store::{OutboxItem, StoreError};
use jitbot_core::{GroupName, RequestId};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a scripted platform was asked to do.
#[derive(Clone, Debug, PartialEq)]
enum Call {
    Post(String),
    Update(String),
    Send(String),
}

/// A chat platform whose answers the test scripts: each call takes the next
/// scripted outcome, or the standing one when the script is empty.
struct Scripted {
    name: &'static str,
    script: Mutex<VecDeque<Result<(), ChatError>>>,
    standing: Mutex<Result<(), ChatError>>,
    /// Calls made, with whether they succeeded.
    calls: Mutex<Vec<(Call, bool)>>,
    /// Posts hang forever after reaching the platform (a crash stand-in).
    hang_after_post: AtomicBool,
}

impl Scripted {
    fn new(name: &'static str) -> Arc<Scripted> {
        Arc::new(Scripted {
            name,
            script: Mutex::new(VecDeque::new()),
            standing: Mutex::new(Ok(())),
            calls: Mutex::new(Vec::new()),
            hang_after_post: AtomicBool::new(false),
        })
    }
    fn fail_next(&self, times: usize, error: ChatError) {
        let mut s = self.script.lock().unwrap();
        for _ in 0..times {
            s.push_back(Err(error.clone()));
        }
    }
    fn always(&self, outcome: Result<(), ChatError>) {
        *self.standing.lock().unwrap() = outcome;
    }
    fn outcome(&self, call: Call) -> Result<(), ChatError> {
        let r = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| self.standing.lock().unwrap().clone());
        self.calls.lock().unwrap().push((call, r.is_ok()));
        r
    }
    fn calls(&self) -> Vec<(Call, bool)> {
        self.calls.lock().unwrap().clone()
    }
    /// Successful calls.
    fn delivered(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|(_, ok)| *ok)
            .map(|(c, _)| c)
            .collect()
    }
    fn attempts(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
}

#[async_trait]
impl Notifier for Scripted {
    async fn post_approval(&self, card: &ApprovalCard) -> Result<Vec<MessageRef>, ChatError> {
        self.outcome(Call::Post(card.request.to_string()))?;
        if self.hang_after_post.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        Ok(vec![MessageRef {
            platform: self.name.into(),
            channel: "C1".into(),
            id: format!("{}-{}", self.name, self.attempts()),
            copy: Default::default(),
        }])
    }
    async fn update_approval(&self, at: &MessageRef, _card: &ApprovalCard) -> Result<(), ChatError> {
        self.outcome(Call::Update(at.id.clone()))
    }
    async fn send(&self, notice: &Notice) -> Result<(), ChatError> {
        self.outcome(Call::Send(notice.text.clone()))
    }
}

fn fanout(platforms: &[&Arc<Scripted>]) -> Fanout {
    Fanout::new(
        platforms
            .iter()
            .map(|p| (p.name.to_string(), (*p).clone() as Arc<dyn Notifier>))
            .collect(),
    )
}

async fn queue(bot: &TestBot, to: Audience, text: &str) {
    let item = OutboxItem::Send {
        notice: Notice {
            to,
            text: text.into(),
            buttons: vec![],
            tone: Default::default(),
        },
    };
    bot.engine
        .store()
        .update(bot.engine.now(), |tx| {
            tx.outbox(item.clone());
            Ok::<(), StoreError>(())
        })
        .await
        .unwrap();
}

/// Drains once and moves the test clock to when the outbox says the next
/// entry is due.
async fn drain_and_wait(bot: &TestBot, notifier: &dyn Notifier) {
    let wait = drain(&bot.engine, notifier).await;
    bot.advance(chrono::Duration::from_std(wait).unwrap() + chrono::Duration::milliseconds(1));
}

fn group() -> Audience {
    Audience::Group(GroupName::new("db-admins"))
}

crate::both_stores!(alert_survives_many_failures_and_is_delivered_when_the_platform_recovers);
async fn alert_survives_many_failures_and_is_delivered_when_the_platform_recovers(backend: Backend) {
    let bot = backend.builder().build();
    let slack = Scripted::new("slack");
    slack.always(Err(ChatError::Unavailable("slack is down".into())));
    queue(&bot, Audience::Alert, "cannot remove alice from db-admins").await;
    let failures = 3 * MAX_ATTEMPTS as usize;
    for _ in 0..failures {
        drain_and_wait(&bot, slack.as_ref()).await;
    }
    let left = bot.engine.store().outbox(10).unwrap();
    assert_eq!(
        left.len(),
        1,
        "the alert is still queued after {failures} failures"
    );
    assert_eq!(left[0].2 as usize, failures, "every failure counted");
    slack.always(Ok(()));
    drain_and_wait(&bot, slack.as_ref()).await;
    assert_eq!(
        slack.delivered(),
        vec![Call::Send("cannot remove alice from db-admins".into())],
        "delivered once the platform recovered"
    );
    assert!(bot.engine.store().outbox(10).unwrap().is_empty());
}

crate::both_stores!(ordinary_notice_is_given_up_after_its_last_attempt);
async fn ordinary_notice_is_given_up_after_its_last_attempt(backend: Backend) {
    let bot = backend.builder().build();
    let slack = Scripted::new("slack");
    slack.always(Err(ChatError::Refused("channel_not_found".into())));
    queue(&bot, group(), "alice holds db-admins").await;
    for _ in 0..(MAX_ATTEMPTS + 3) {
        drain_and_wait(&bot, slack.as_ref()).await;
    }
    assert_eq!(slack.attempts(), MAX_ATTEMPTS as usize);
    assert!(bot.engine.store().outbox(10).unwrap().is_empty(), "given up");
}

crate::both_stores!(rate_limited_destination_does_not_block_another);
async fn rate_limited_destination_does_not_block_another(backend: Backend) {
    let bot = backend.builder().build();
    let (slack, discord) = (Scripted::new("slack"), Scripted::new("discord"));
    slack.always(Err(ChatError::RateLimited(60)));
    let both = fanout(&[&slack, &discord]);
    for i in 0..5 {
        queue(&bot, group(), &format!("notice {i}")).await;
    }
    queue(&bot, Audience::Alert, "the alert").await;
    drain(&bot.engine, &both).await;
    // The alert first (issue 13: alerts are drained before user traffic).
    let sent: Vec<Call> = [Call::Send("the alert".into())]
        .into_iter()
        .chain((0..5).map(|i| Call::Send(format!("notice {i}"))))
        .collect();
    assert_eq!(
        discord.delivered(),
        sent,
        "discord got everything at once, the alert first"
    );
    assert_eq!(slack.attempts(), 1, "slack asked for a pause: its queue waits");
    // A 429 that never ends is waited out, one call per pause, and nothing
    // is given up (only a platform's permanent refusal ends delivery);
    // discord is not sent anything twice.
    for _ in 0..(6 * MAX_ATTEMPTS) {
        bot.advance(chrono::Duration::seconds(61));
        drain(&bot.engine, &both).await;
    }
    assert_eq!(
        slack.attempts(),
        1 + 6 * MAX_ATTEMPTS as usize,
        "one call per pause"
    );
    let left = bot.engine.store().outbox(10).unwrap();
    assert_eq!(left.len(), 6, "still queued for slack: {left:?}");
    assert_eq!(discord.delivered(), sent);
}

crate::both_stores!(partial_post_is_retried_only_on_the_failed_platform);
async fn partial_post_is_retried_only_on_the_failed_platform(backend: Backend) {
    let bot = backend.builder().build();
    let (slack, discord) = (Scripted::new("slack"), Scripted::new("discord"));
    discord.fail_next(2, ChatError::Refused("missing access".into()));
    let both = fanout(&[&slack, &discord]);
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 2h replicas down").await);
    queue(&bot, group(), "a notice for the group").await;
    drain_and_wait(&bot, &both).await;
    assert_eq!(slack.attempts(), 2, "slack: the card and the notice");
    assert_eq!(discord.delivered(), vec![]);
    for _ in 0..3 {
        drain_and_wait(&bot, &both).await;
    }
    assert_eq!(
        slack.calls(),
        vec![
            (Call::Post(id.clone()), true),
            (Call::Send("a notice for the group".into()), true)
        ],
        "nothing re-sent to slack"
    );
    let mut retried = discord.delivered();
    retried.sort_by_key(|c| format!("{c:?}"));
    assert_eq!(
        retried,
        vec![
            Call::Post(id.clone()),
            Call::Send("a notice for the group".into())
        ],
        "each retried once on discord (in either order: each has its own backoff)"
    );
    let rec = bot.engine.store().request(&RequestId::new(&id)).unwrap().unwrap();
    let platforms: Vec<&str> = rec.messages.iter().map(|m| m.platform.as_str()).collect();
    assert_eq!(platforms, ["slack", "discord"], "both cards recorded");
    // A decision updates each card on its own platform, once.
    bot.ok("bob", &format!("approve {id}")).await;
    drain(&bot.engine, &both).await;
    for p in [&slack, &discord] {
        let updates: Vec<String> = p
            .delivered()
            .into_iter()
            .filter_map(|c| match c {
                Call::Update(m) => Some(m),
                _ => None,
            })
            .collect();
        assert!(!updates.is_empty(), "{}: card updated", p.name);
        assert!(
            updates.iter().all(|m| m.starts_with(p.name)),
            "{} updates only its own card: {updates:?}",
            p.name
        );
    }
    assert!(bot.engine.store().outbox(10).unwrap().is_empty());
}

crate::both_stores!(engine_wake_ups_do_not_burn_attempts);
async fn engine_wake_ups_do_not_burn_attempts(backend: Backend) {
    // The first retry waits at least 30 s (60 s, halved at most by jitter).
    let bot = backend
        .builder()
        .settings(|s| s.retry_base = jitbot_core::Span::from_mins(1))
        .build();
    let slack = Scripted::new("slack");
    slack.always(Err(ChatError::Unavailable("timeout".into())));
    let (stop, rx) = tokio::sync::watch::channel(false);
    let notifier: Arc<dyn Notifier> = slack.clone();
    let worker = tokio::spawn(jitbot::chat::outbox::run(bot.engine.clone(), notifier, rx));
    queue(&bot, Audience::Alert, "cannot remove alice").await;
    bot.engine.outbox_changed().notify_one();
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        bot.engine.outbox_changed().notify_one();
    }
    // Sixty wake-ups make no second attempt before the backoff is over.
    assert_eq!(slack.attempts(), 1, "{:?}", slack.calls());
    let left = bot.engine.store().outbox(10).unwrap();
    assert_eq!((left.len(), left[0].2), (1, 1), "{left:?}");
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), worker)
        .await
        .expect("the worker stops")
        .unwrap();
}

crate::both_stores!(backoff_survives_a_restart);
async fn backoff_survives_a_restart(backend: Backend) {
    let bot = backend.builder().build();
    let slack = Scripted::new("slack");
    slack.fail_next(1, ChatError::Unavailable("timeout".into()));
    queue(&bot, group(), "hello").await;
    drain(&bot.engine, slack.as_ref()).await;
    let dir = bot_directory(&bot);
    let bot = bot.restart(dir, crate::support::bot::policy());
    drain(&bot.engine, slack.as_ref()).await;
    assert_eq!(slack.attempts(), 1, "not due yet after the restart");
    bot.advance(chrono::Duration::minutes(1));
    drain(&bot.engine, slack.as_ref()).await;
    assert_eq!(slack.delivered(), vec![Call::Send("hello".into())]);
}

fn bot_directory(bot: &TestBot) -> Arc<dyn jitbot::ports::Directory> {
    bot.dir.clone()
}

crate::both_stores!(crash_between_posting_a_card_and_recording_it_is_known_and_posts_at_most_once_more);
async fn crash_between_posting_a_card_and_recording_it_is_known_and_posts_at_most_once_more(
    backend: Backend,
) {
    let bot = backend.builder().build();
    let slack = Scripted::new("slack");
    slack.hang_after_post.store(true, Ordering::SeqCst);
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 2h replicas down").await);
    // The post reaches slack, then jitbot "crashes" before recording it.
    let crashed = tokio::time::timeout(Duration::from_millis(300), drain(&bot.engine, slack.as_ref())).await;
    assert!(crashed.is_err(), "the post hung");
    let dir = bot_directory(&bot);
    let bot = bot.restart(dir, crate::support::bot::policy());
    let jobs = bot
        .engine
        .store()
        .outbox_due("chat", bot.engine.now(), 10)
        .unwrap();
    assert_eq!(jobs.len(), 1);
    assert!(jobs[0].interrupted_post, "the restart knows a copy may be posted");
    slack.hang_after_post.store(false, Ordering::SeqCst);
    drain(&bot.engine, slack.as_ref()).await;
    drain(&bot.engine, slack.as_ref()).await;
    let posts = slack
        .calls()
        .iter()
        .filter(|(c, _)| matches!(c, Call::Post(_)))
        .count();
    assert_eq!(
        posts, 2,
        "one post before the crash, one after: at most one duplicate"
    );
    let rec = bot.engine.store().request(&RequestId::new(&id)).unwrap().unwrap();
    assert_eq!(
        rec.messages.len(),
        1,
        "the second post is recorded: {:?}",
        rec.messages
    );
    assert!(bot.engine.store().outbox(10).unwrap().is_empty());
}

/// A platform that takes `budget` calls and then answers 429 for a minute,
/// like Slack under a burst of posts to one channel.
struct Limited {
    budget: Mutex<usize>,
    delivered: Mutex<Vec<String>>,
}

impl Limited {
    fn take(&self, what: String) -> Result<(), ChatError> {
        let mut budget = self.budget.lock().unwrap();
        if *budget == 0 {
            return Err(ChatError::RateLimited(60));
        }
        *budget -= 1;
        self.delivered.lock().unwrap().push(what);
        Ok(())
    }
}

#[async_trait]
impl Notifier for Limited {
    async fn post_approval(&self, card: &ApprovalCard) -> Result<Vec<MessageRef>, ChatError> {
        self.take(format!("card {}", card.request))?;
        Ok(vec![MessageRef {
            platform: "slack".into(),
            channel: "C1".into(),
            id: card.request.to_string(),
            copy: Default::default(),
        }])
    }
    async fn update_approval(&self, at: &MessageRef, _card: &ApprovalCard) -> Result<(), ChatError> {
        self.take(format!("update {}", at.id))
    }
    async fn send(&self, notice: &Notice) -> Result<(), ChatError> {
        self.take(notice.text.clone())
    }
}

crate::both_stores!(a_break_glass_alert_is_not_queued_behind_user_cards);
/// Issue 13 item 10 ("keep alerts off the queue that user traffic can
/// fill"), from the adversarial review: thirty people each open one request
/// (within the per-person cap), then someone breaks glass. The platform
/// rate-limits after five calls; the break-glass alert must be among them,
/// not behind the thirty approval cards queued before it.
async fn a_break_glass_alert_is_not_queued_behind_user_cards(backend: Backend) {
    let bot = backend
        .builder()
        .policy(|p| {
            for i in 0..30 {
                p.groups[0]
                    .requesters
                    .users
                    .insert(jitbot_core::UserId::new(format!("u{i}")));
            }
            p.groups[1].break_glass = true;
        })
        .build();
    for i in 0..30 {
        let user = format!("u{i}");
        let mail = format!("{user}@example.org");
        bot.dir.add_user(&user, [("mail", mail.as_str())]);
        bot.ok(&user, "request db-admins 1h routine work").await;
    }
    let glass = bot.say("alice", "breakglass web-admins 1h prod down").await;
    assert!(glass.ok, "{}", glass.text);
    let platform = Limited {
        budget: Mutex::new(5),
        delivered: Mutex::new(Vec::new()),
    };
    drain(&bot.engine, &platform).await;
    let delivered = platform.delivered.lock().unwrap().clone();
    assert!(
        delivered.iter().any(|d| d.contains("BREAK-GLASS")),
        "the platform took 5 calls and the break-glass alert was not among them: {delivered:?}"
    );
}

/// Queue keys written before priorities (`dest 0x00 [due] [id]`) are
/// re-keyed when the store opens: a restart on an older store loses no
/// entry, fanned out or not, and an alert already queued moves ahead of
/// the notices queued before it.
#[tokio::test]
async fn queue_entries_from_before_priorities_survive_a_restart_and_alerts_go_first() {
    use jitbot::store::Store;
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("db");
    let now = chrono::Utc::now();
    let send = |to: Audience, text: &str| OutboxItem::Send {
        notice: Notice {
            to,
            text: text.into(),
            buttons: vec![],
            tone: Default::default(),
        },
    };
    {
        let store = Store::open(&db, 8).unwrap();
        store
            .update(now, |tx| {
                tx.outbox(send(group(), "routine 1"));
                tx.outbox(send(group(), "routine 2"));
                tx.outbox(send(Audience::Alert, "urgent"));
                Ok::<(), StoreError>(())
            })
            .await
            .unwrap();
        assert_eq!(
            store.outbox_fan_out(now, 10, |_| vec!["slack".into()]).unwrap(),
            3
        );
        store
            .update(now, |tx| {
                tx.outbox(send(group(), "not fanned out yet"));
                Ok::<(), StoreError>(())
            })
            .await
            .unwrap();
        store.flush().await.unwrap();
    }
    // Rewrite every queue key the way an older jitbot wrote it.
    {
        let raw = crate::support::open_raw_sled(&db);
        let due = raw.open_tree("outbox_due").unwrap();
        let keys: Vec<sled::IVec> = due.iter().keys().map(|k| k.unwrap()).collect();
        assert_eq!(keys.len(), 4);
        for k in keys {
            let nul = k.iter().position(|b| *b == 0).unwrap();
            assert_eq!(k.len() - nul - 1, 17, "today's keys carry a priority byte");
            let mut old = k[..=nul].to_vec();
            old.extend_from_slice(&k[nul + 2..]);
            due.remove(&k).unwrap();
            due.insert(old, &[][..]).unwrap();
        }
        raw.flush().unwrap();
    }
    let store = Store::open(&db, 8).unwrap();
    assert_eq!(store.check_consistency().unwrap(), Vec::<String>::new());
    let later = now + chrono::Duration::seconds(1);
    let jobs = store.outbox_due("slack", later, 10).unwrap();
    let texts: Vec<String> = jobs
        .iter()
        .map(|j| match &j.item {
            OutboxItem::Send { notice } => notice.text.clone(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        texts,
        ["urgent", "routine 1", "routine 2"],
        "nothing lost, the alert first"
    );
    assert_eq!(
        store.outbox_fan_out(later, 10, |_| vec!["slack".into()]).unwrap(),
        1
    );
    for job in store.outbox_due("slack", later, 10).unwrap() {
        store.outbox_finish(job.id, "slack").unwrap();
    }
    assert!(store.outbox(10).unwrap().is_empty(), "every entry delivered once");
    assert_eq!(store.outbox_next_due("slack").unwrap(), None);
}

/// A notice queued by a jitbot from before tones (its text starting with
/// the Slack shortcode that marked it) still delivers once on every
/// platform after an upgrade: Slack shows its emoji as before, the web
/// console shows the words without the code.
#[tokio::test]
async fn a_notice_queued_with_a_shortcode_before_an_upgrade_still_delivers() {
    use jitbot::chat::slack::SlackAdapter;
    use jitbot::chat::web::WebConsole;
    use jitbot::secret::Secret;
    use jitbot::store::Store;
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("db");
    let now = chrono::Utc::now();
    let words = "alice now has `db-admins` until 10:00:00 UTC (lease l-1).";
    {
        let store = Store::open(&db, 8).unwrap();
        store
            .update(now, |tx| {
                tx.outbox(OutboxItem::Send {
                    notice: Notice {
                        to: group(),
                        text: words.into(),
                        buttons: vec![],
                        tone: Default::default(),
                    },
                });
                Ok::<(), StoreError>(())
            })
            .await
            .unwrap();
        store.flush().await.unwrap();
    }
    // Rewrite the entry as the older jitbot wrote it: no tone, a shortcode.
    {
        let raw = crate::support::open_raw_sled(&db);
        let outbox = raw.open_tree("outbox").unwrap();
        let entries: Vec<(sled::IVec, sled::IVec)> = outbox.iter().map(|e| e.unwrap()).collect();
        assert_eq!(entries.len(), 1);
        for (k, v) in entries {
            let mut json: serde_json::Value = serde_json::from_slice(&v).unwrap();
            let notice = &mut json["item"]["notice"];
            assert!(
                notice.get("tone").is_none(),
                "a plain notice is written without a tone"
            );
            notice["text"] = format!(":key: {words}").into();
            outbox.insert(k, serde_json::to_vec(&json).unwrap()).unwrap();
        }
        raw.flush().unwrap();
    }
    let store = Store::open(&db, 8).unwrap();
    let clock = jitbot::clock::ManualClock::new(now + chrono::Duration::seconds(1));
    let engine = jitbot::engine::Engine::new(
        crate::support::bot::policy(),
        store,
        Arc::new(jitbot::directory::memory::MemoryDirectory::new()),
        Arc::new(clock.clone()),
        Default::default(),
    );
    let slack = crate::support::fake_slack::FakeSlack::start().await;
    let adapter =
        SlackAdapter::with_token(&crate::slack::config(slack.api_url()), Secret::new("xoxb-test")).unwrap();
    let console = Arc::new(WebConsole::new(Arc::new(clock.clone())));
    let both = Fanout::new(vec![
        ("slack".into(), Arc::new(adapter) as Arc<dyn Notifier>),
        ("web".into(), console.clone() as Arc<dyn Notifier>),
    ]);
    for _ in 0..3 {
        drain(&engine, &both).await;
    }
    let posts = slack.calls_to("chat.postMessage");
    assert_eq!(posts.len(), 1, "delivered once on Slack: {posts:#?}");
    assert_eq!(
        posts[0].body["text"],
        format!(":key: {words}"),
        "Slack keeps its emoji"
    );
    let shown: Vec<String> = console
        .changes(0, None)
        .messages
        .into_iter()
        .map(|m| m.text)
        .collect();
    assert_eq!(shown, [words], "delivered once on the console, without the code");
    assert!(
        engine.store().outbox(10).unwrap().is_empty(),
        "nothing left queued"
    );
}
