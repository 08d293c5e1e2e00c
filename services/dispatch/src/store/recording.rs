//! Writes whose events the relay publishes. The relay sleeps until woken (or its poll
//! interval passes); every transaction that records history comes from [`Db::begin`], and
//! committing it wakes the relay, so no write path has to remember to.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::Notify;

/// Dispatch's database, with the relay that publishes what its transactions record.
#[derive(Clone)]
pub struct Db {
    pub pool: PgPool,
    relay_wake: Arc<Notify>,
}

impl Db {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            relay_wake: Arc::new(Notify::new()),
        }
    }

    /// What the relay waits on.
    pub fn relay_wake(&self) -> Arc<Notify> {
        self.relay_wake.clone()
    }

    /// A transaction whose commit wakes the relay.
    pub async fn begin(&self) -> Result<Recording, sqlx::Error> {
        Ok(Recording {
            tx: self.pool.begin().await?,
            relay_wake: self.relay_wake.clone(),
        })
    }
}

/// A transaction that may record work-order history; dropping it uncommitted rolls back.
pub struct Recording {
    tx: Transaction<'static, Postgres>,
    relay_wake: Arc<Notify>,
}

impl Recording {
    /// Commits, then wakes the relay for what was recorded.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await?;
        self.relay_wake.notify_one();
        Ok(())
    }
}

impl Deref for Recording {
    type Target = Transaction<'static, Postgres>;

    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

impl DerefMut for Recording {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.tx
    }
}
