//! Posting an approval card to a group's channel and to approvers' DMs, the
//! same way on every platform: each platform says how to post one copy
//! ([`CardCopies`]); this module decides which copies go where, lists the
//! approvers no DM reached on the channel card, and remembers that list so
//! later updates of the channel card keep it. A post that fails part way
//! hands back the copies it made ([`PostError`]), and a retry given them
//! posts only the missing ones: copies are told apart by their channel.

use crate::ports::{ApprovalCard, ChatError, Contact, MessageRef, PostError};
use async_trait::async_trait;
use jitbot_core::UserId;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

/// Why a card could not go to an approver by DM.
#[derive(Debug)]
pub enum DmError {
    /// They cannot be reached by DM on this platform (no chat identity,
    /// DMs closed, the platform refused): the channel card lists them.
    Unreachable(String),
    /// Not now (a rate limit, an outage): the post fails with this error and
    /// the outbox tries the missing copies again later.
    Failed(ChatError),
}

/// How one platform posts and edits the copies of an approval card.
#[async_trait]
pub trait CardCopies: Send + Sync {
    /// Posts the card in the group's channel.
    async fn post_in_channel(&self, card: &ApprovalCard) -> Result<MessageRef, ChatError>;
    /// Rewrites a posted copy.
    async fn rewrite(&self, at: &MessageRef, card: &ApprovalCard) -> Result<(), ChatError>;
    /// Opens (or finds) the DM channel with one approver: the same channel
    /// every time, as [`MessageRef::channel`] names it.
    async fn open_dm(&self, to: &Contact) -> Result<String, DmError>;
    /// Posts the card in a DM channel [`CardCopies::open_dm`] gave.
    async fn post_in_dm(&self, dm: &str, card: &ApprovalCard) -> Result<MessageRef, ChatError>;
}

/// Approvers not reached by DM, per channel card (`channel/id`), so updates
/// of that card keep listing them. In memory: after a restart, updates no
/// longer list them (the first post's copy did).
#[derive(Default)]
pub struct Unreachable(Mutex<HashMap<String, Vec<UserId>>>);

fn key(at: &MessageRef) -> String {
    format!("{}/{}", at.channel, at.id)
}

impl Unreachable {
    fn remember(&self, at: &MessageRef, users: Vec<UserId>) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(key(at), users);
        }
    }

    /// `card` as the copy at `at` shows it: with the approvers its first
    /// post listed. Forgets them once the card is decided (its last update).
    pub fn for_copy(&self, at: &MessageRef, card: &ApprovalCard) -> ApprovalCard {
        let mut card = card.clone();
        if let Ok(mut map) = self.0.lock() {
            let listed = if card.open {
                map.get(&key(at)).cloned()
            } else {
                map.remove(&key(at))
            };
            if let Some(users) = listed {
                card.recipients.unreachable = users;
            }
        }
        card
    }
}

/// Posts `card` where its [`crate::ports::Recipients`] say, on one platform,
/// leaving out the copies in `already` (posted by an earlier attempt that
/// failed part way). The channel copy goes first when asked for (its failure
/// fails the post, before any DM), then one DM per approver. An approver no
/// DM reaches is logged and listed on the channel card, which is then posted
/// (or rewritten) even with `approval_cards = "dm"`; so is a card no DM
/// reached at all. A DM that fails for now (rate limit, outage) does not
/// make its approver unreachable: the other DMs go out, then the post fails
/// with the copies made so far, and the retry posts the rest. Returns the
/// new copies.
pub async fn post(
    platform: &str,
    copies: &dyn CardCopies,
    unreachable: &Unreachable,
    card: &ApprovalCard,
    already: &[MessageRef],
) -> Result<Vec<MessageRef>, PostError> {
    let mut posted = Vec::new();
    let mut channel = None;
    if card.recipients.channel && already.is_empty() {
        let at = copies.post_in_channel(card).await?;
        posted.push(at.clone());
        channel = Some(at);
    }
    let mut dms = Vec::new();
    let mut missed = Vec::new();
    let mut later = None;
    for to in &card.recipients.dm {
        match post_dm(copies, to, card, already).await {
            Ok((dm, at)) => {
                posted.extend(at);
                dms.push(dm);
            }
            Err(DmError::Unreachable(why)) => {
                tracing::warn!(
                    platform,
                    request = %card.request,
                    approver = %to.user,
                    reason = %why,
                    "approver not reached by DM; the channel card lists them"
                );
                missed.push(to.user.clone());
            }
            Err(DmError::Failed(error)) => {
                tracing::warn!(
                    platform,
                    request = %card.request,
                    approver = %to.user,
                    error = %error,
                    "approver's DM not sent for now; the card's missing copies are retried"
                );
                later.get_or_insert(error);
            }
        }
    }
    if let Some(error) = later {
        return Err(PostError { posted, error });
    }
    // A copy posted earlier outside every approver's DM is the channel copy.
    let channel = channel.or_else(|| already.iter().find(|m| !dms.contains(&m.channel)).cloned());
    if !card.recipients.channel && missed.is_empty() && !dms.is_empty() {
        return Ok(posted);
    }
    let mut listed = card.clone();
    listed.recipients.unreachable = missed.clone();
    match channel {
        Some(at) => {
            if !missed.is_empty() {
                // The channel copy went out before the DMs were tried.
                if let Err(e) = copies.rewrite(&at, &listed).await {
                    tracing::warn!(platform, request = %card.request, error = %e, "cannot list the approvers no DM reached on the channel card");
                }
                unreachable.remember(&at, missed);
            }
        }
        None => {
            if dms.is_empty() && !card.recipients.channel {
                tracing::info!(platform, request = %card.request, "no approver got this card by DM; posting it in the channel");
            }
            let at = match copies.post_in_channel(&listed).await {
                Ok(at) => at,
                Err(error) => return Err(PostError { posted, error }),
            };
            if !missed.is_empty() {
                unreachable.remember(&at, missed);
            }
            posted.push(at);
        }
    }
    Ok(posted)
}

/// One approver's DM copy: their DM channel, and the copy if it is new (none
/// when `already` has one there). A platform's refusal to post makes them
/// unreachable; any other failure is for later.
async fn post_dm(
    copies: &dyn CardCopies,
    to: &Contact,
    card: &ApprovalCard,
    already: &[MessageRef],
) -> Result<(String, Option<MessageRef>), DmError> {
    let dm = copies.open_dm(to).await?;
    if already.iter().any(|m| m.channel == dm) {
        return Ok((dm, None));
    }
    match copies.post_in_dm(&dm, card).await {
        Ok(at) => Ok((dm, Some(at))),
        Err(ChatError::Refused(why)) => Err(DmError::Unreachable(format!("cannot post in the DM: {why}"))),
        Err(e) => Err(DmError::Failed(e)),
    }
}

/// Runs a chat call up to `tries` times, waiting out each rate limit whose
/// pause is at most `max_wait` seconds; any other outcome, or a longer
/// pause, is returned as is (the outbox then waits it out).
pub(crate) async fn waiting_out_rate_limits<T, F, Fut>(
    tries: u32,
    max_wait: u64,
    mut call: F,
) -> Result<T, ChatError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ChatError>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match call().await {
            Err(ChatError::RateLimited(secs)) if attempt < tries && secs <= max_wait => {
                tokio::time::sleep(Duration::from_secs(secs.max(1))).await
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::Recipients;
    use jitbot_core::{GroupName, RequestId};

    /// Records what was posted where; DMs to `closed` are refused, DMs to
    /// `limited` rate limited; the channel fails when `channel_down`.
    #[derive(Default)]
    struct Copies {
        log: Mutex<Vec<String>>,
        closed: Vec<&'static str>,
        limited: Mutex<Vec<&'static str>>,
        channel_down: Mutex<u32>,
    }

    fn at(channel: &str) -> MessageRef {
        MessageRef {
            platform: "test".into(),
            channel: channel.into(),
            id: "1".into(),
        }
    }

    #[async_trait]
    impl CardCopies for Copies {
        async fn post_in_channel(&self, card: &ApprovalCard) -> Result<MessageRef, ChatError> {
            let mut down = self.channel_down.lock().unwrap();
            if *down > 0 {
                *down -= 1;
                return Err(ChatError::Unavailable("down".into()));
            }
            let listed: Vec<&str> = card.recipients.unreachable.iter().map(|u| u.as_str()).collect();
            self.log.lock().unwrap().push(format!("channel {listed:?}"));
            Ok(at("C"))
        }
        async fn rewrite(&self, _: &MessageRef, card: &ApprovalCard) -> Result<(), ChatError> {
            let listed: Vec<&str> = card.recipients.unreachable.iter().map(|u| u.as_str()).collect();
            self.log.lock().unwrap().push(format!("rewrite {listed:?}"));
            Ok(())
        }
        async fn open_dm(&self, to: &Contact) -> Result<String, DmError> {
            let mut limited = self.limited.lock().unwrap();
            if let Some(i) = limited.iter().position(|u| *u == to.user.as_str()) {
                limited.remove(i);
                return Err(DmError::Failed(ChatError::RateLimited(1)));
            }
            Ok(format!("D{}", to.user))
        }
        async fn post_in_dm(&self, dm: &str, _: &ApprovalCard) -> Result<MessageRef, ChatError> {
            self.log.lock().unwrap().push(format!("dm {}", &dm[1..]));
            if self.closed.contains(&&dm[1..]) {
                return Err(ChatError::Refused("closed".into()));
            }
            Ok(at(dm))
        }
    }

    fn card(channel: bool, dm: &[&str]) -> ApprovalCard {
        ApprovalCard {
            request: RequestId::new("r-1"),
            group: GroupName::new("db"),
            requester: UserId::new("alice"),
            duration: "1h".into(),
            reason: "x".into(),
            extension: false,
            approvals: vec![],
            needed: 1,
            status: "pending".into(),
            open: true,
            recipients: Recipients {
                channel,
                dm: dm
                    .iter()
                    .map(|u| Contact {
                        user: UserId::new(*u),
                        attributes: Default::default(),
                    })
                    .collect(),
                unreachable: vec![],
            },
        }
    }

    async fn run(copies: &Copies, card: &ApprovalCard) -> (Result<Vec<MessageRef>, PostError>, Vec<String>) {
        let seen = Unreachable::default();
        let r = post("test", copies, &seen, card, &[]).await;
        (r, copies.log.lock().unwrap().clone())
    }

    #[tokio::test]
    async fn which_copies_go_where() {
        // dm, all reached: no channel copy.
        let (r, log) = run(&Copies::default(), &card(false, &["bob", "carol"])).await;
        assert_eq!(log, ["dm bob", "dm carol"]);
        assert_eq!(r.unwrap().len(), 2);
        // dm, nobody to DM: the channel.
        let (r, log) = run(&Copies::default(), &card(false, &[])).await;
        assert_eq!(log, ["channel []"]);
        assert_eq!(r.unwrap().len(), 1);
        // dm, one unreachable: the channel lists them.
        let copies = Copies {
            closed: vec!["carol"],
            ..Copies::default()
        };
        let (r, log) = run(&copies, &card(false, &["bob", "carol"])).await;
        assert_eq!(log, ["dm bob", "dm carol", "channel [\"carol\"]"]);
        assert_eq!(r.unwrap().len(), 2);
        // both, one unreachable: channel first, then rewritten.
        let copies = Copies {
            closed: vec!["bob"],
            ..Copies::default()
        };
        let (r, log) = run(&copies, &card(true, &["bob", "carol"])).await;
        assert_eq!(log, ["channel []", "dm bob", "dm carol", "rewrite [\"bob\"]"]);
        assert_eq!(r.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_failed_channel_post_fails_before_any_dm() {
        let copies = Copies {
            channel_down: Mutex::new(1),
            ..Copies::default()
        };
        let (r, log) = run(&copies, &card(true, &["bob"])).await;
        assert_eq!(r.unwrap_err().posted, []);
        assert!(log.is_empty(), "{log:?}");
    }

    #[tokio::test]
    async fn a_retry_posts_only_the_missing_copies() {
        // dm, carol unreachable: the channel post after the DMs fails once.
        let copies = Copies {
            closed: vec!["carol"],
            channel_down: Mutex::new(1),
            ..Copies::default()
        };
        let c = card(false, &["bob", "carol"]);
        let seen = Unreachable::default();
        let failed = post("test", &copies, &seen, &c, &[]).await.unwrap_err();
        assert_eq!(failed.posted, [at("Dbob")], "bob's DM is handed back");
        let again = post("test", &copies, &seen, &c, &failed.posted).await.unwrap();
        assert_eq!(again, [at("C")]);
        assert_eq!(
            *copies.log.lock().unwrap(),
            ["dm bob", "dm carol", "dm carol", "channel [\"carol\"]"],
            "bob's DM is not posted twice"
        );
        // both: the channel copy of the first attempt is found again.
        let copies = Copies {
            limited: Mutex::new(vec!["bob"]),
            ..Copies::default()
        };
        let c = card(true, &["bob", "carol"]);
        let failed = post("test", &copies, &seen, &c, &[]).await.unwrap_err();
        assert_eq!(
            failed.error,
            ChatError::RateLimited(1),
            "a rate limit is not unreachable"
        );
        assert_eq!(failed.posted, [at("C"), at("Dcarol")]);
        let again = post("test", &copies, &seen, &c, &failed.posted).await.unwrap();
        assert_eq!(again, [at("Dbob")]);
        assert_eq!(
            *copies.log.lock().unwrap(),
            ["channel []", "dm carol", "dm bob"],
            "each copy once, nobody listed as unreachable"
        );
    }

    #[test]
    fn updates_keep_the_list_until_decided() {
        let seen = Unreachable::default();
        seen.remember(&at("C"), vec![UserId::new("bob")]);
        let mut c = card(true, &[]);
        assert_eq!(
            seen.for_copy(&at("C"), &c).recipients.unreachable,
            [UserId::new("bob")]
        );
        assert!(seen.for_copy(&at("Dx"), &c).recipients.unreachable.is_empty());
        c.open = false;
        assert_eq!(
            seen.for_copy(&at("C"), &c).recipients.unreachable,
            [UserId::new("bob")]
        );
        assert!(
            seen.for_copy(&at("C"), &c).recipients.unreachable.is_empty(),
            "forgotten once decided"
        );
    }
}
