//! The chat platform contract, written once: request → approval card →
//! self-approval refused → approve → grant notice; extend and release from
//! the grant notice's buttons; deny with a reason; a click delivered twice;
//! rate limits (the platform's 429 on a card post, and jitbot's cap on the
//! requests one person keeps waiting); a forged signature. Every platform
//! mode runs it through [`Platform`], a small harness trait its own test
//! module implements over its wire format (`slack.rs`, `socket_mode.rs`,
//! `discord.rs`, `gateway.rs`, `console.rs`), so a new platform inherits
//! the whole specification by implementing it.
//!
//! alice may request `db-admins` and `web-admins` everywhere;
//! [`Platform::approver`] may approve `db-admins` (bob in memory, carol
//! through nested groups in slapd). Every mode runs with
//! `policy.max_pending_per_user = 1`.

use crate::support::bot::Backend;
use jitbot::chat::render;
use std::time::Duration;

/// How long a scenario waits for something a platform shows.
pub const WAIT: Duration = Duration::from_secs(20);

/// What became of a click delivered a second time with the same id.
#[derive(Debug)]
pub enum Replay {
    /// Dropped without an answer (Slack: a retry is acknowledged, not redone).
    Dropped,
    /// Answered without running anything (Discord answers every interaction).
    Answered(String),
    /// The transport has no click ids to replay; the reason says why.
    NotApplicable(&'static str),
}

/// The posts of one card in the group's channel, as the platform saw them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Posts {
    /// New messages the platform accepted (edits are not posts).
    pub accepted: usize,
    /// Posts it refused with its rate limit.
    pub rate_limited: usize,
}

impl Posts {
    /// Counts posts from whether each was refused with the rate limit.
    pub fn from_flags(rate_limited: impl IntoIterator<Item = bool>) -> Posts {
        let (mut accepted, mut limited) = (0, 0);
        for refused in rate_limited {
            if refused {
                limited += 1;
            } else {
                accepted += 1;
            }
        }
        Posts {
            accepted,
            rate_limited: limited,
        }
    }
}

/// One chat platform mode, driven as its users would drive it.
#[async_trait::async_trait]
pub trait Platform: Send + Sync {
    /// Which mode this is, for failure messages.
    fn mode(&self) -> &'static str;
    /// Someone who may approve alice's `db-admins` requests.
    fn approver(&self) -> &'static str {
        "bob"
    }
    /// `/jit <text>` typed by `user` (`request <group> <duration>
    /// <reason>` or `cancel <request>`); the answer only they see.
    async fn type_command(&self, user: &str, text: &str) -> String;
    /// `user` clicks the button whose action id is `action`; `click` names
    /// this delivery (its trigger, interaction or action id). The answer
    /// only the clicker sees.
    async fn press(&self, user: &str, action: &str, click: u32) -> String;
    /// The same click delivered again, as a platform's retry or a replay.
    async fn press_again(&self, user: &str, action: &str, click: u32) -> Replay;
    /// `user` clicks Deny on `request` and gives `reason` in the form the
    /// platform opens for it; the answer only they see.
    async fn deny_with_reason(&self, user: &str, request: &str, reason: &str) -> String;
    /// The newest rendering of `request`'s card in the group's channel
    /// (wire format, as text), once `ready` holds for it.
    async fn card(&self, request: &str, ready: &(dyn for<'x> Fn(&'x str) -> bool + Sync)) -> String;
    /// The newest direct message to `user` containing `needle`.
    async fn direct_message(&self, user: &str, needle: &str) -> String;
    /// Waits until `user` is (or is not) in `db-admins`.
    async fn wait_member(&self, user: &str, member: bool);
    /// A command with a forged signature: the HTTP status it got, or `None`
    /// when the transport carries no signature (an authenticated socket,
    /// the demo's console).
    async fn forged_command(&self) -> Option<u16>;
    /// Makes the platform refuse the next post in `db-admins`' channel with
    /// its rate limit (Slack: HTTP 429 `ratelimited` with `Retry-After: 1`;
    /// Discord: 429 with `retry_after: 1`); false for a platform that has
    /// no rate limit (the console).
    async fn rate_limit_next_card(&self) -> bool;
    /// The posts of `request`'s card in `db-admins`' channel so far.
    async fn card_posts(&self, request: &str) -> Posts;
}

/// Runs the whole contract against one platform mode.
pub async fn run(p: &dyn Platform) {
    let mode = p.mode();

    // Request → card with Approve and Deny.
    let answer = p
        .type_command("alice", "request db-admins 30m fixing replication")
        .await;
    let id = crate::support::bot::TestBot::request_id(&answer);
    let approve = format!("jit:approve:{id}");
    let deny = format!("jit:deny:{id}");
    let card = p.card(&id, &|c| c.contains(&approve)).await;
    assert!(
        card.contains(&deny) && card.contains("fixing replication"),
        "{mode}: {card}"
    );
    assert!(card.contains("0 of 1"), "{mode}: approvals shown: {card}");

    // Self-approval is refused and changes nothing.
    let own = p.press("alice", &approve, 1).await;
    assert!(own.contains("cannot approve your own request"), "{mode}: {own}");

    // The approver approves: alice is granted and told, with Extend and
    // Release; the click delivered again does nothing more.
    let approver = p.approver();
    let approved = p.press(approver, &approve, 2).await;
    assert!(approved.contains(&format!("Approved {id}")), "{mode}: {approved}");
    match p.press_again(approver, &approve, 2).await {
        Replay::Dropped => {}
        Replay::NotApplicable(why) => eprintln!("{mode}: no replay to try: {why}"),
        Replay::Answered(text) => assert_eq!(text, render::ALREADY_HANDLED, "{mode}"),
    }
    p.wait_member("alice", true).await;
    let decided = p
        .card(&id, &|c| {
            c.contains(&format!("approved by {approver}")) && !c.contains(&approve)
        })
        .await;
    assert!(!decided.contains(&deny), "{mode}: buttons removed: {decided}");
    let grant = p.direct_message("alice", "You have `db-admins` until").await;
    let lease = action_target(&grant, "jit:release:")
        .unwrap_or_else(|| panic!("{mode}: no Release button on the grant notice: {grant}"));
    let extend = format!("jit:extend:{lease}");
    assert!(grant.contains(&extend), "{mode}: no Extend button: {grant}");

    // Extend, then release, from the notice's buttons.
    let extended = p.press("alice", &extend, 3).await;
    assert!(extended.contains("Extended until"), "{mode}: {extended}");
    let released = p.press("alice", &format!("jit:release:{lease}"), 4).await;
    assert!(released.contains(lease.as_str()), "{mode}: {released}");
    p.wait_member("alice", false).await;

    // Deny with a reason: the requester hears it, the card closes.
    let answer = p.type_command("alice", "request db-admins 30m second try").await;
    let second = crate::support::bot::TestBot::request_id(&answer);
    p.card(&second, &|c| c.contains(&format!("jit:deny:{second}")))
        .await;
    let denied = p
        .deny_with_reason(approver, &second, "not during the freeze")
        .await;
    assert!(denied.contains(&format!("Denied {second}")), "{mode}: {denied}");
    let told = p.direct_message("alice", "not during the freeze").await;
    assert!(told.contains(&second), "{mode}: {told}");
    p.card(&second, &|c| {
        c.contains("denied") && !c.contains(&format!("jit:deny:{second}"))
    })
    .await;

    rate_limits(p).await;

    // A forged signature is refused before anything runs.
    if let Some(status) = p.forged_command().await {
        assert_eq!(status, 401, "{mode}: a forged signature must be refused");
    }
}

/// The platform's rate limit defers a card post, which still arrives once;
/// jitbot's own limit (one request waiting per person in these modes)
/// refuses one more request through the platform, with what to do, and
/// queues nothing for it; cancelling frees the slot.
async fn rate_limits(p: &dyn Platform) {
    let mode = p.mode();
    let limited = p.rate_limit_next_card().await;
    let answer = p.type_command("alice", "request db-admins 30m third try").await;
    let third = crate::support::bot::TestBot::request_id(&answer);
    let approve = format!("jit:approve:{third}");
    p.card(&third, &|c| c.contains(&approve)).await;

    let refused = p
        .type_command("alice", "request web-admins 30m one too many")
        .await;
    for part in [
        "the most jitbot takes from one person",
        third.as_str(),
        "/jit cancel",
    ] {
        assert!(
            refused.contains(part),
            "{mode}: `{part}` missing from the refusal: {refused}"
        );
    }

    let cancelled = p.type_command("alice", &format!("cancel {third}")).await;
    assert!(
        cancelled.contains(&format!("Cancelled {third}")),
        "{mode}: {cancelled}"
    );
    p.card(&third, &|c| c.contains("cancelled") && !c.contains(&approve))
        .await;
    // By now the card's update went out after its post on the same queue:
    // a second post of it would have gone before.
    let posts = p.card_posts(&third).await;
    assert_eq!(
        posts,
        Posts {
            accepted: 1,
            rate_limited: usize::from(limited),
        },
        "{mode}: the card posted once, after the platform's 429 when it has one"
    );

    // The slot is free again: the same request now waits for a decision.
    let fits = p
        .type_command("alice", "request web-admins 30m now it fits")
        .await;
    let fourth = crate::support::bot::TestBot::request_id(&fits);
    assert_ne!(fourth, third, "{mode}: {fits}");
}

/// Whether `text` names request (or lease) `id` as a word of its own, so
/// that `r-1` is not found in `r-12`.
pub fn mentions(text: &str, id: &str) -> bool {
    text.match_indices(id).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + id.len()..].chars().next();
        let apart = |c: Option<char>| !c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-');
        apart(before) && apart(after)
    })
}

/// The target of the first button id starting with `prefix` in `text`.
fn action_target(text: &str, prefix: &str) -> Option<String> {
    let at = text.find(prefix)? + prefix.len();
    let id: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    (!id.is_empty()).then_some(id)
}

crate::both_stores!(slack_http_mode_keeps_the_contract);
async fn slack_http_mode_keeps_the_contract(backend: Backend) {
    run(&crate::slack::contract_platform(backend).await).await;
}

crate::both_stores!(discord_http_mode_keeps_the_contract);
async fn discord_http_mode_keeps_the_contract(backend: Backend) {
    run(&crate::discord::contract_platform(backend).await).await;
}

crate::both_stores!(
    web_console_keeps_the_contract,
    flavor = "multi_thread",
    worker_threads = 2
);
async fn web_console_keeps_the_contract(backend: Backend) {
    run(&crate::console::contract_platform(backend).await).await;
}

crate::both_stores!(
    slack_socket_mode_keeps_the_contract,
    flavor = "multi_thread",
    worker_threads = 2
);
async fn slack_socket_mode_keeps_the_contract(backend: Backend) {
    run(&crate::socket_mode::contract_platform(backend).await).await;
}

crate::both_stores!(
    discord_gateway_keeps_the_contract,
    flavor = "multi_thread",
    worker_threads = 2
);
async fn discord_gateway_keeps_the_contract(backend: Backend) {
    run(&crate::gateway::contract_platform(backend).await).await;
}
