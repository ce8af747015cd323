//! Notifier plumbing: a fan-out over every configured platform, and a
//! notifier that only logs (when no chat platform is configured).

use crate::ports::{ApprovalCard, ChatError, Contact, MessageRef, Notice, Notifier};
use async_trait::async_trait;
use std::sync::Arc;

/// Sends to every platform; approval cards are updated on the platform
/// that posted them. The outbox does not go through these aggregate calls:
/// it delivers to each of [`Notifier::platforms`] on its own, so that one
/// failing platform is retried alone.
pub struct Fanout {
    platforms: Vec<(String, Arc<dyn Notifier>)>,
}

impl Fanout {
    pub fn new(platforms: Vec<(String, Arc<dyn Notifier>)>) -> Self {
        Fanout { platforms }
    }
}

#[async_trait]
impl Notifier for Fanout {
    /// Posts on every platform; fails if any platform failed (the cards
    /// other platforms posted are logged, since the caller gets no
    /// reference to them).
    async fn post_approval(&self, card: &ApprovalCard) -> Result<Vec<MessageRef>, ChatError> {
        let mut all = Vec::new();
        let mut first_err = None;
        for (name, n) in &self.platforms {
            match n.post_approval(card).await {
                Ok(refs) => all.extend(refs),
                Err(e) => {
                    tracing::warn!(platform = %name, error = %e, request = %card.request, "approval card not posted");
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => {
                if !all.is_empty() {
                    tracing::warn!(request = %card.request, posted = ?all, "approval card posted on some platforms only");
                }
                Err(e)
            }
            None => Ok(all),
        }
    }

    async fn update_approval(&self, at: &MessageRef, card: &ApprovalCard) -> Result<(), ChatError> {
        match self.platforms.iter().find(|(name, _)| *name == at.platform) {
            Some((_, n)) => n.update_approval(at, card).await,
            None => Ok(()),
        }
    }

    async fn send(&self, notice: &Notice) -> Result<(), ChatError> {
        let mut result = Ok(());
        for (name, n) in &self.platforms {
            // A notice for a person goes only to the platform they used.
            if let crate::ports::Audience::User { chat: Some(chat), .. } = &notice.to {
                if chat.platform != *name {
                    continue;
                }
            }
            if let Err(e) = n.send(notice).await {
                result = Err(e);
            }
        }
        result
    }

    async fn send_to(&self, notice: &Notice, contact: &Contact) -> Result<(), ChatError> {
        let mut result = Ok(());
        for (name, n) in &self.platforms {
            if let crate::ports::Audience::User { chat: Some(chat), .. } = &notice.to {
                if chat.platform != *name {
                    continue;
                }
            }
            if let Err(e) = n.send_to(notice, contact).await {
                result = Err(e);
            }
        }
        result
    }

    fn contact_attributes(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .platforms
            .iter()
            .flat_map(|(_, n)| n.contact_attributes())
            .collect();
        all.sort();
        all.dedup();
        all
    }

    async fn ready(&self) -> Result<(), ChatError> {
        for (name, n) in &self.platforms {
            n.ready()
                .await
                .map_err(|e| ChatError::Unavailable(format!("{name}: {e}")))?;
        }
        Ok(())
    }

    fn platforms(&self) -> Vec<(String, Arc<dyn Notifier>)> {
        self.platforms.clone()
    }
}

/// Writes notices to the log only.
pub struct LogNotifier;

#[async_trait]
impl Notifier for LogNotifier {
    async fn post_approval(&self, card: &ApprovalCard) -> Result<Vec<MessageRef>, ChatError> {
        tracing::info!(request = %card.request, group = %card.group, "approval needed");
        Ok(Vec::new())
    }
    async fn update_approval(&self, _at: &MessageRef, _card: &ApprovalCard) -> Result<(), ChatError> {
        Ok(())
    }
    async fn send(&self, notice: &Notice) -> Result<(), ChatError> {
        tracing::info!(to = ?notice.to, text = %notice.text, "notice");
        Ok(())
    }
}
