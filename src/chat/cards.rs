//! Posting an approval card to a group's channel and to approvers' DMs, the
//! same way on every platform: each platform says how to post one copy
//! ([`CardCopies`]); this module decides which copies go where and records
//! each copy with what it is ([`CardCopy`]: the channel copy with the
//! approvers it lists, or the DM copy for given approvers) the moment it is
//! posted ([`CopyLog`]). A retry skips, without any call to the platform,
//! every approver whose copy is recorded; updates of the channel copy keep
//! listing the approvers its record names.

use crate::ports::{ApprovalCard, CardCopy, ChatError, Contact, CopyLog, MessageRef, PostError};
use async_trait::async_trait;
use std::sync::Mutex;

/// Why a card could not go to an approver by DM.
#[derive(Debug)]
pub enum DmError {
    /// They cannot be reached by DM on this platform (no chat identity,
    /// DMs closed, the platform refused): the channel card lists them.
    Unreachable(String),
    /// Not now (a rate limit, an outage): the channel card lists them as
    /// pending, the post fails with this error and the outbox tries the
    /// missing copies again later.
    Failed(ChatError),
}

/// How one platform posts and edits the copies of an approval card. None
/// of these calls waits out a rate limit: it returns it, and the outbox
/// retries after the pause.
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

/// `card` as the copy at `at` shows it: the channel copy with the
/// approvers its record lists (those still pending, and the approver
/// groups not listed, only while the card is open).
pub fn for_copy(at: &MessageRef, card: &ApprovalCard) -> ApprovalCard {
    let mut card = card.clone();
    if let CardCopy::Channel {
        unreachable,
        pending,
        unlisted,
    } = &at.copy
    {
        card.recipients.unreachable = unreachable.clone();
        if card.open {
            card.recipients.pending = pending.clone();
            card.recipients.unlisted = unlisted.clone();
        }
    }
    card
}

/// A [`CopyLog`] that keeps the copies in memory, for a post whose copies
/// are returned at the end ([`crate::ports::Notifier::post_approval`]).
#[derive(Default)]
pub struct Collected(Mutex<Vec<MessageRef>>);

impl Collected {
    /// The copies recorded, each once.
    pub fn into_copies(self) -> Vec<MessageRef> {
        self.0.into_inner().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl CopyLog for Collected {
    async fn record(&self, copy: &MessageRef) -> Result<(), ChatError> {
        let mut copies = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match copies.iter_mut().find(|m| m.same_message(copy)) {
            Some(m) => *m = copy.clone(),
            None => copies.push(copy.clone()),
        }
        Ok(())
    }
}

/// Posts `card` where its [`crate::ports::Recipients`] say, on one platform,
/// leaving out the copies in `already` (recorded by earlier attempts), and
/// hands each new copy to `log` before the next call.
///
/// The channel copy goes first when asked for (its failure fails the post,
/// before any DM). Then one DM per approver: an approver whose DM copy is
/// recorded is skipped without any call; an approver whose DM channel got a
/// copy in this post is added to that copy. An approver no DM reaches is
/// logged and listed on the channel card; one whose DM fails for now (rate
/// limit, outage) is listed as pending, and after a rate limit on opening
/// a DM the remaining approvers are left pending without calls. The channel card is
/// then posted (or rewritten) listing them whenever it exists, someone is unreachable
/// or pending, an approver group could not be listed, or no DM copy exists,
/// even with `approval_cards = "dm"`; only then does the post fail
/// ([`PostError::deferred`]) so the outbox retries the missing copies.
pub async fn post(
    platform: &str,
    copies: &dyn CardCopies,
    card: &ApprovalCard,
    already: &[MessageRef],
    log: &dyn CopyLog,
) -> Result<(), PostError> {
    let mut channel: Option<MessageRef> = already
        .iter()
        .find(|m| matches!(m.copy, CardCopy::Channel { .. }))
        .cloned();
    // A copy recorded before copies said what they are (a request in flight
    // at an upgrade) is the channel copy, unless it is found below in an
    // approver's DM channel: no second channel copy is posted meanwhile.
    let unknown = channel.is_none() && already.iter().any(|m| m.copy.is_unknown());
    if card.recipients.channel && channel.is_none() && !unknown {
        let mut at = copies.post_in_channel(card).await?;
        at.copy = CardCopy::Channel {
            unreachable: Vec::new(),
            pending: Vec::new(),
            unlisted: Vec::new(),
        };
        log.record(&at).await?;
        channel = Some(at);
    }
    // DM copies known so far: recorded by earlier attempts (those of an
    // unknown role may be DM copies: they are matched by DM channel), then
    // those of this post.
    let mut dms: Vec<MessageRef> = already
        .iter()
        .filter(|m| !matches!(m.copy, CardCopy::Channel { .. }))
        .cloned()
        .collect();
    let mut missed = Vec::new();
    let mut pending = Vec::new();
    let mut later: Option<ChatError> = None;
    let mut limited = false;
    for to in &card.recipients.dm {
        let has_copy = dms
            .iter()
            .any(|m| matches!(&m.copy, CardCopy::Dm { approvers } if approvers.contains(&to.user)));
        if has_copy {
            continue;
        }
        if limited {
            pending.push(to.user.clone());
            continue;
        }
        let (outcome, opening) = match copies.open_dm(to).await {
            Ok(dm) => (post_dm(copies, &dm, to, card, &mut dms, log).await?, false),
            Err(e) => (Err(e), true),
        };
        match outcome {
            Ok(()) => {}
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
                    "approver's DM not sent for now; the channel card lists them as pending and their copy is retried"
                );
                // After a rate limit on opening DMs (one budget for all of
                // them), the others wait too: each call would only spend it
                // again. A post's limit is the DM channel's own.
                limited = opening && matches!(error, ChatError::RateLimited(_));
                pending.push(to.user.clone());
                later.get_or_insert(error);
            }
        }
    }
    if channel.is_none() {
        // An old copy no approver's DM channel claimed: the channel copy.
        channel = dms.iter().find(|m| m.copy.is_unknown()).cloned();
    }
    let unlisted = card.recipients.unlisted.clone();
    let no_dm_copy = !dms.iter().any(|m| matches!(m.copy, CardCopy::Dm { .. }));
    // An existing channel copy is brought up to date (approvers no longer
    // pending are no longer listed).
    let needs_channel = card.recipients.channel
        || channel.is_some()
        || !missed.is_empty()
        || !pending.is_empty()
        || !unlisted.is_empty()
        || no_dm_copy;
    if needs_channel {
        let role = CardCopy::Channel {
            unreachable: missed,
            pending,
            unlisted: unlisted.clone(),
        };
        let mut listed = card.clone();
        if let CardCopy::Channel {
            unreachable,
            pending,
            unlisted,
        } = &role
        {
            listed.recipients.unreachable = unreachable.clone();
            listed.recipients.pending = pending.clone();
            listed.recipients.unlisted = unlisted.clone();
        }
        match channel {
            Some(mut at) => {
                if at.copy != role {
                    copies.rewrite(&at, &listed).await?;
                    at.copy = role;
                    log.record(&at).await?;
                }
            }
            None => {
                if no_dm_copy && !card.recipients.channel {
                    tracing::info!(platform, request = %card.request, "no approver got this card by DM; posting it in the channel");
                }
                let mut at = copies.post_in_channel(&listed).await?;
                at.copy = role;
                log.record(&at).await?;
            }
        }
    }
    if let Some(error) = later {
        return Err(PostError {
            error,
            deferred: true,
        });
    }
    if !unlisted.is_empty() {
        return Err(PostError {
            error: ChatError::Unavailable(format!(
                "cannot list the approver groups {} in the directory; their members get the card once it answers",
                unlisted.join(", ")
            )),
            deferred: true,
        });
    }
    Ok(())
}

/// One approver's DM copy in DM channel `dm`: added to the copy there if
/// `dms` has one (another directory person with the same chat account, or a
/// copy recorded before copies said whom they are for), else posted. A
/// platform's refusal to post makes them unreachable; any other failure is
/// for later. The outer error is a failure to record the copy.
async fn post_dm(
    copies: &dyn CardCopies,
    dm: &str,
    to: &Contact,
    card: &ApprovalCard,
    dms: &mut Vec<MessageRef>,
    log: &dyn CopyLog,
) -> Result<Result<(), DmError>, ChatError> {
    if let Some(at) = dms.iter_mut().find(|m| m.channel == dm) {
        let mut approvers = match &at.copy {
            CardCopy::Dm { approvers } => approvers.clone(),
            _ => Vec::new(),
        };
        approvers.push(to.user.clone());
        at.copy = CardCopy::Dm { approvers };
        log.record(at).await?;
        return Ok(Ok(()));
    }
    match copies.post_in_dm(dm, card).await {
        Ok(mut at) => {
            at.copy = CardCopy::Dm {
                approvers: vec![to.user.clone()],
            };
            log.record(&at).await?;
            dms.push(at);
            Ok(Ok(()))
        }
        Err(ChatError::Refused(why)) => {
            Ok(Err(DmError::Unreachable(format!("cannot post in the DM: {why}"))))
        }
        Err(e) => Ok(Err(DmError::Failed(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::Recipients;
    use jitbot_core::{GroupName, RequestId, UserId};

    /// Records what was posted where; DMs to `closed` are refused, DM opens
    /// for `limited` rate limited; the channel fails when `channel_down`.
    /// `same` maps a user to another's DM channel (one chat account).
    #[derive(Default)]
    struct Copies {
        log: Mutex<Vec<String>>,
        closed: Vec<&'static str>,
        limited: Mutex<Vec<&'static str>>,
        channel_down: Mutex<u32>,
        same: Vec<(&'static str, &'static str)>,
    }

    fn at(channel: &str) -> MessageRef {
        MessageRef {
            platform: "test".into(),
            channel: channel.into(),
            id: "1".into(),
            copy: CardCopy::Unknown,
        }
    }

    fn listed(card: &ApprovalCard) -> String {
        let names = |v: &[UserId]| v.iter().map(|u| u.as_str().to_string()).collect::<Vec<_>>();
        format!(
            "{:?}{:?}",
            names(&card.recipients.unreachable),
            names(&card.recipients.pending)
        )
    }

    #[async_trait]
    impl CardCopies for Copies {
        async fn post_in_channel(&self, card: &ApprovalCard) -> Result<MessageRef, ChatError> {
            let mut down = self.channel_down.lock().unwrap();
            if *down > 0 {
                *down -= 1;
                return Err(ChatError::Unavailable("down".into()));
            }
            self.log.lock().unwrap().push(format!("channel {}", listed(card)));
            Ok(at("C"))
        }
        async fn rewrite(&self, _: &MessageRef, card: &ApprovalCard) -> Result<(), ChatError> {
            self.log.lock().unwrap().push(format!("rewrite {}", listed(card)));
            Ok(())
        }
        async fn open_dm(&self, to: &Contact) -> Result<String, DmError> {
            self.log.lock().unwrap().push(format!("open {}", to.user));
            let mut limited = self.limited.lock().unwrap();
            if let Some(i) = limited.iter().position(|u| *u == to.user.as_str()) {
                limited.remove(i);
                return Err(DmError::Failed(ChatError::RateLimited(1)));
            }
            let user = self
                .same
                .iter()
                .find(|(u, _)| *u == to.user.as_str())
                .map_or(to.user.as_str(), |(_, other)| other);
            Ok(format!("D{user}"))
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
                ..Recipients::default()
            },
        }
    }

    fn users(names: &[&str]) -> Vec<UserId> {
        names.iter().map(|n| UserId::new(*n)).collect()
    }

    fn channel_copy(unreachable: &[&str], pending: &[&str]) -> CardCopy {
        CardCopy::Channel {
            unreachable: users(unreachable),
            pending: users(pending),
            unlisted: vec![],
        }
    }

    async fn run(
        copies: &Copies,
        card: &ApprovalCard,
        already: &[MessageRef],
    ) -> (Result<(), PostError>, Vec<MessageRef>) {
        let log = Collected::default();
        let r = post("test", copies, card, already, &log).await;
        (r, log.into_copies())
    }

    fn take_log(copies: &Copies) -> Vec<String> {
        std::mem::take(&mut *copies.log.lock().unwrap())
    }

    #[tokio::test]
    async fn which_copies_go_where() {
        // dm, all reached: no channel copy.
        let copies = Copies::default();
        let (r, made) = run(&copies, &card(false, &["bob", "carol"]), &[]).await;
        assert_eq!(
            take_log(&copies),
            ["open bob", "dm bob", "open carol", "dm carol"]
        );
        r.unwrap();
        assert_eq!(
            made.iter().map(|m| m.copy.clone()).collect::<Vec<_>>(),
            [
                CardCopy::Dm {
                    approvers: users(&["bob"])
                },
                CardCopy::Dm {
                    approvers: users(&["carol"])
                }
            ]
        );
        // dm, nobody to DM: the channel.
        let (r, made) = run(&copies, &card(false, &[]), &[]).await;
        assert_eq!(take_log(&copies), ["channel [][]"]);
        r.unwrap();
        assert_eq!(made[0].copy, channel_copy(&[], &[]));
        // dm, one unreachable: the channel lists them, and its record too.
        let copies = Copies {
            closed: vec!["carol"],
            ..Copies::default()
        };
        let (r, made) = run(&copies, &card(false, &["bob", "carol"]), &[]).await;
        assert_eq!(
            take_log(&copies),
            [
                "open bob",
                "dm bob",
                "open carol",
                "dm carol",
                "channel [\"carol\"][]"
            ]
        );
        r.unwrap();
        assert_eq!(made.len(), 2);
        assert_eq!(made[1].copy, channel_copy(&["carol"], &[]));
        // both, one unreachable: channel first, then rewritten.
        let copies = Copies {
            closed: vec!["bob"],
            ..Copies::default()
        };
        let (r, made) = run(&copies, &card(true, &["bob", "carol"]), &[]).await;
        assert_eq!(
            take_log(&copies),
            [
                "channel [][]",
                "open bob",
                "dm bob",
                "open carol",
                "dm carol",
                "rewrite [\"bob\"][]"
            ]
        );
        r.unwrap();
        assert_eq!(made.len(), 2);
        assert_eq!(
            made[0].copy,
            channel_copy(&["bob"], &[]),
            "the rewrite is recorded"
        );
    }

    #[tokio::test]
    async fn a_failed_channel_post_fails_before_any_dm() {
        let copies = Copies {
            channel_down: Mutex::new(1),
            ..Copies::default()
        };
        let (r, made) = run(&copies, &card(true, &["bob"]), &[]).await;
        assert!(!r.unwrap_err().deferred);
        assert!(made.is_empty());
        assert!(take_log(&copies).is_empty());
    }

    #[tokio::test]
    async fn a_rate_limit_defers_the_rest_and_the_channel_card_lists_them() {
        let copies = Copies {
            limited: Mutex::new(vec!["bob"]),
            ..Copies::default()
        };
        let c = card(false, &["bob", "carol"]);
        let (r, made) = run(&copies, &c, &[]).await;
        let e = r.unwrap_err();
        assert_eq!(
            e.error,
            ChatError::RateLimited(1),
            "a rate limit is not unreachable"
        );
        assert!(e.deferred);
        assert_eq!(
            take_log(&copies),
            ["open bob", "channel [][\"bob\", \"carol\"]"],
            "no more DM opens after a rate limit; the card is in the channel meanwhile"
        );
        // The retry posts the DMs and rewrites the channel card without them.
        let (r, again) = run(&copies, &c, &made).await;
        r.unwrap();
        assert_eq!(
            take_log(&copies),
            ["open bob", "dm bob", "open carol", "dm carol", "rewrite [][]"]
        );
        assert_eq!(again.last().unwrap().copy, channel_copy(&[], &[]));
    }

    #[tokio::test]
    async fn a_retry_skips_recorded_approvers_without_a_call() {
        let mut bob = at("Dbob");
        bob.copy = CardCopy::Dm {
            approvers: users(&["bob"]),
        };
        let mut channel = at("C");
        channel.copy = channel_copy(&[], &["carol"]);
        let copies = Copies {
            closed: vec!["carol"],
            ..Copies::default()
        };
        let (r, made) = run(&copies, &card(false, &["bob", "carol"]), &[bob, channel]).await;
        r.unwrap();
        assert_eq!(
            take_log(&copies),
            ["open carol", "dm carol", "rewrite [\"carol\"][]"],
            "bob is not asked about; the channel copy is the recorded one"
        );
        assert_eq!(made[0].copy, channel_copy(&["carol"], &[]));
    }

    #[tokio::test]
    async fn a_dm_copy_is_never_taken_for_the_channel_copy() {
        // carol's DM copy exists; now she and frank are unreachable.
        let mut carol = at("Dcarol");
        carol.copy = CardCopy::Dm {
            approvers: users(&["carol"]),
        };
        let copies = Copies {
            closed: vec!["frank"],
            ..Copies::default()
        };
        let (r, made) = run(&copies, &card(false, &["carol", "frank"]), &[carol]).await;
        r.unwrap();
        assert_eq!(
            take_log(&copies),
            ["open frank", "dm frank", "channel [\"frank\"][]"]
        );
        assert_eq!(made[0].copy, channel_copy(&["frank"], &[]));
    }

    #[tokio::test]
    async fn a_copy_recorded_before_roles_is_the_channel_copy() {
        // `both`, in flight at an upgrade: the old channel copy has no role.
        let copies = Copies::default();
        let (r, made) = run(&copies, &card(true, &["bob"]), &[at("C")]).await;
        r.unwrap();
        assert_eq!(
            take_log(&copies),
            ["open bob", "dm bob", "rewrite [][]"],
            "no second channel copy; the old one is rewritten once with its role"
        );
        assert_eq!(made.len(), 2);
        assert_eq!(made[1].copy, channel_copy(&[], &[]), "{made:?}");
        assert!(made[1].same_message(&at("C")));
        // The next retry finds it by its role and calls nothing.
        let (r, _) = run(&copies, &card(true, &["bob"]), &made).await;
        r.unwrap();
        assert!(take_log(&copies).is_empty());

        // An old copy in an approver's DM channel is still their DM copy;
        // the channel copy is posted.
        let (r, made) = run(&copies, &card(true, &["bob"]), &[at("Dbob")]).await;
        r.unwrap();
        assert_eq!(take_log(&copies), ["open bob", "channel [][]"]);
        assert_eq!(
            made.iter().map(|m| m.copy.clone()).collect::<Vec<_>>(),
            [
                CardCopy::Dm {
                    approvers: users(&["bob"])
                },
                channel_copy(&[], &[])
            ]
        );
    }

    #[tokio::test]
    async fn one_dm_channel_gets_one_copy_for_both_approvers() {
        let copies = Copies {
            same: vec![("carol", "bob")],
            ..Copies::default()
        };
        let (r, made) = run(&copies, &card(false, &["bob", "carol"]), &[]).await;
        r.unwrap();
        assert_eq!(take_log(&copies), ["open bob", "dm bob", "open carol"]);
        assert_eq!(made.len(), 1);
        assert_eq!(
            made[0].copy,
            CardCopy::Dm {
                approvers: users(&["bob", "carol"])
            }
        );
    }

    #[tokio::test]
    async fn an_unlisted_approver_group_is_named_and_retried() {
        let copies = Copies::default();
        let mut c = card(false, &["bob"]);
        c.recipients.unlisted = vec!["cn=security".into()];
        let (r, made) = run(&copies, &c, &[]).await;
        let e = r.unwrap_err();
        assert!(e.deferred, "{e}");
        assert!(matches!(e.error, ChatError::Unavailable(_)));
        assert_eq!(made.len(), 2, "bob's DM and the channel card naming the group");
        assert!(
            matches!(&made[1].copy, CardCopy::Channel { unlisted, .. } if unlisted == &["cn=security".to_string()])
        );
    }

    #[test]
    fn updates_show_what_the_channel_copy_lists() {
        let mut channel = at("C");
        channel.copy = channel_copy(&["bob"], &["carol"]);
        let mut c = card(true, &[]);
        let shown = for_copy(&channel, &c);
        assert_eq!(shown.recipients.unreachable, users(&["bob"]));
        assert_eq!(shown.recipients.pending, users(&["carol"]));
        assert!(for_copy(&at("Dx"), &c).recipients.unreachable.is_empty());
        c.open = false;
        let shown = for_copy(&channel, &c);
        assert_eq!(shown.recipients.unreachable, users(&["bob"]));
        assert!(
            shown.recipients.pending.is_empty(),
            "nobody is pending once decided"
        );
    }
}
