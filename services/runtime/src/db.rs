//! PostgreSQL: a pool whose connections work in the service's own schema and plan each
//! statement for the arguments it runs with, with the service's embedded migrations applied
//! at start. Schemas keep services that share one database (as in docker compose) from
//! touching each other's tables or migration history.

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool};
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseArgs;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database URL: {0}")]
    Url(#[source] sqlx::Error),
    #[error("schema name {0:?} must be lower-case ASCII letters and underscores")]
    Schema(String),
    #[error("cannot reach PostgreSQL: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Connects (retrying until PostgreSQL answers or `cancel` fires), creates `schema`, and
/// applies `migrator` in it. Migrations take an advisory lock, so replicas may race.
pub async fn connect(
    args: &DatabaseArgs,
    schema: &'static str,
    migrator: &Migrator,
    cancel: &CancellationToken,
) -> Result<PgPool, DbError> {
    let pool = pool(args, schema)?;
    prepare(&pool, schema, migrator, cancel).await?;
    Ok(pool)
}

/// A pool for `schema` that connects on first use: a service that must start while
/// PostgreSQL is away builds it, then [`prepare`]s it in the background.
pub fn pool(args: &DatabaseArgs, schema: &'static str) -> Result<PgPool, DbError> {
    if schema.is_empty() || !schema.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
        return Err(DbError::Schema(schema.to_owned()));
    }
    let base = PgConnectOptions::from_str(args.database_url.expose()).map_err(DbError::Url)?;
    // Plan every execution for its real arguments. Our statements take arrays of one to
    // hundreds of rows and optional filters, and tables start empty: a cached generic plan,
    // costed once on a near-empty table, kept scanning `customer_progress` in full for a
    // 40-key lookup (20 ms a batch in bench-loop). Batching keeps executions few: the
    // planning this adds cost PostgreSQL less than the bad plans did (BENCHMARKS.md).
    //
    // No JIT compilation. PostgreSQL compiles a statement whose estimated cost passes
    // `jit_above_cost`, and estimates for array probes grow with the table while their
    // work does not: at a million work orders, placement's lookup of the open work orders a
    // batch may join was costed past the threshold and spent about 80 ms compiling for
    // 20 ms of work, each batch (bench-api, BENCHMARKS.md). Our statements are short.
    let mut options = base.clone().options([
        ("search_path", schema),
        ("plan_cache_mode", "force_custom_plan"),
        ("jit", "off"),
    ]);
    // Named after the service, so `pg_stat_activity` (and bench-loop's CPU split) can tell
    // whose sessions they are; a name given in the URL wins.
    if base.get_application_name().is_none() {
        options = options.application_name(&application_name(schema));
    }
    Ok(PgPoolOptions::new()
        .max_connections(args.database_max_connections.max(1))
        .acquire_timeout(Duration::from_secs(10))
        // sqlx pings a connection on every checkout by default: a second round trip for
        // every pooled query (9% of notify's CPU in bench-loop). A connection that broke
        // while idle fails its query instead, which the consume loop retries like any
        // database error.
        .test_before_acquire(false)
        .connect_lazy_with(options))
}

/// Creates `schema` and applies `migrator` in it, retrying until PostgreSQL answers or
/// `cancel` fires.
pub async fn prepare(
    pool: &PgPool,
    schema: &'static str,
    migrator: &Migrator,
    cancel: &CancellationToken,
) -> Result<(), DbError> {
    let mut delay = Duration::from_millis(100);
    loop {
        let error = match pool
            .execute(format!("CREATE SCHEMA IF NOT EXISTS {schema}").as_str())
            .await
        {
            Ok(_) => break,
            Err(error) => error,
        };
        tracing::warn!(%error, "PostgreSQL not reachable yet; retrying");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = cancel.cancelled() => return Err(DbError::Connect(error)),
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
    migrator.run(pool).await?;
    Ok(())
}

/// Whether PostgreSQL answers a query on `pool` now: what a consumer asks before it blames
/// a failed event rather than the database.
pub async fn ping(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1").execute(pool).await.map(|_| ())
}

/// Whether PostgreSQL refused `error` for what a statement carried (a value it will never
/// take: a NUL byte in text, a string too long, a missing required value) rather than for
/// its own state. A batch refused this way is worth writing item by item.
pub fn is_data_error(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(error) => error.code().is_some_and(|code| {
            // Class 22 is "data exception"; 23502 and 23514 are not-null and check violations.
            code.starts_with("22") || code == "23502" || code == "23514"
        }),
        sqlx::Error::Encode(_) | sqlx::Error::ColumnDecode { .. } => true,
        _ => false,
    }
}

/// The `application_name` of a service's sessions when the URL names none.
pub fn application_name(schema: &str) -> String {
    format!("closedloop-{schema}")
}

/// Builds a struct from a row: each listed field from the column of the same name, then any
/// fields after a second `;` as written there. A column that is missing or of another type
/// returns the `sqlx::Error` from the enclosing function.
/// `from_columns![Team; row; team_id, name; skills: Vec::new()]`
#[macro_export]
macro_rules! from_columns {
    [$ty:ident; $row:expr; $($field:ident),* $(,)? $(; $($rest:tt)*)?] => {
        $ty { $($field: ::sqlx::Row::try_get($row, stringify!($field))?,)* $($($rest)*)? }
    };
}

/// Where a record lives: the hot tables the loop writes, or the archive tables finished
/// records move to at the retention age (see `crate::archive`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Hot,
    Archive,
}

impl Tier {
    /// Both tiers, hot first.
    pub const BOTH: [Tier; 2] = [Tier::Hot, Tier::Archive];

    /// The table of this tier: `hot`, or its archive `archive`.
    pub fn table(self, hot: &'static str, archive: &'static str) -> &'static str {
        match self {
            Tier::Hot => hot,
            Tier::Archive => archive,
        }
    }
}

/// A keyset listing of a tenant's records, newest first, over the hot tier or both: the
/// filter of a listing, and what [`list_page`] needs to read one page of it. Its `Debug`
/// spelling binds page tokens to it (see [`crate::grpc::PageScope::of`]).
pub trait Listing: std::fmt::Debug {
    type Item;
    /// The key of a row; the next page starts below the key of this page's last row.
    type Position: Copy;
    type Error: From<sqlx::Error> + From<crate::grpc::ForeignPageToken>;
    /// The key's columns, as a row value (`seq`, `(created_at, id)`); every index a listing
    /// walks ends with them.
    const KEY: &'static str;
    /// The same columns in descending order.
    const ORDER_BY: &'static str;

    /// Whether archived records are listed too.
    fn include_archived(&self) -> bool;
    /// `SELECT … FROM` the tier's table, with the columns [`Self::item`] reads.
    fn select(tier: Tier) -> String;
    /// One ` AND column = value` for each filter given, and none for the others: each
    /// combination is its own prepared statement with its own plan, where a generic plan
    /// over `$n IS NULL OR …` could not pick the index that fits.
    fn push_filters<'a>(&'a self, query: &mut sqlx::QueryBuilder<'a, sqlx::Postgres>);
    /// The position's values, in the shape of [`Self::KEY`].
    fn push_position(query: &mut sqlx::QueryBuilder<'_, sqlx::Postgres>, position: Self::Position);
    fn item(row: &sqlx::postgres::PgRow) -> Result<Self::Item, Self::Error>;
    fn position(row: &sqlx::postgres::PgRow) -> Result<Self::Position, sqlx::Error>;
    /// The position as a page token carries it, and back (`None` for text it did not write).
    fn encode(position: Self::Position) -> String;
    fn decode(text: &str) -> Option<Self::Position>;
}

/// Pushes ` AND {column} = value` when `value` is given.
pub fn and_eq<'a, T>(query: &mut sqlx::QueryBuilder<'a, sqlx::Postgres>, column: &str, value: Option<T>)
where
    T: 'a + sqlx::Encode<'a, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    if let Some(value) = value {
        query.push(format!(" AND {column} = ")).push_bind(value);
    }
}

/// One tier's statement of `listing`: at most `limit` of `tenant`'s rows below `after`,
/// newest first. Pushed onto a builder the caller starts, so that it can also run under
/// `EXPLAIN` (bench-api prints the plans).
pub fn push_listing<'a, L: Listing>(
    query: &mut sqlx::QueryBuilder<'a, sqlx::Postgres>,
    listing: &'a L,
    tier: Tier,
    tenant: &'a str,
    after: Option<L::Position>,
    limit: i64,
) {
    query
        .push(format!("{} WHERE tenant = ", L::select(tier)))
        .push_bind(tenant);
    listing.push_filters(query);
    if let Some(position) = after {
        query.push(format!(" AND {} < ", L::KEY));
        L::push_position(query, position);
    }
    query
        .push(format!(" ORDER BY {} LIMIT ", L::ORDER_BY))
        .push_bind(limit);
}

/// One page of `tenant`'s records under `listing` and the token of the next page (empty at
/// the end), bound to this tenant and this filter. With archived records included, both
/// tiers' statements are merged; each walks its own index with its own limit, so the merge
/// reads two first pages.
pub async fn list_page<L: Listing>(
    pool: &PgPool,
    tenant: &str,
    listing: &L,
    page_size: u32,
    page_token: &str,
) -> Result<(Vec<L::Item>, String), L::Error> {
    let scope = crate::grpc::PageScope::of(tenant, listing);
    let after = match scope.open(page_token)? {
        Some(text) => Some(L::decode(&text).ok_or(crate::grpc::ForeignPageToken)?),
        None => None,
    };
    // One row more than the page: if it comes, there is a next page.
    let limit = i64::from(page_size) + 1;
    let mut query = sqlx::QueryBuilder::new("");
    if listing.include_archived() {
        query.push("(");
        push_listing(&mut query, listing, Tier::Hot, tenant, after, limit);
        query.push(") UNION ALL (");
        push_listing(&mut query, listing, Tier::Archive, tenant, after, limit);
        query
            .push(format!(") ORDER BY {} LIMIT ", L::ORDER_BY))
            .push_bind(limit);
    } else {
        push_listing(&mut query, listing, Tier::Hot, tenant, after, limit);
    }
    let rows = query.build().fetch_all(pool).await?;
    let mut items = rows.iter().map(L::item).collect::<Result<Vec<_>, _>>()?;
    let size = page_size as usize;
    if items.len() <= size || size == 0 {
        return Ok((items, String::new()));
    }
    items.truncate(size);
    let next = scope.seal(&L::encode(L::position(&rows[size - 1])?));
    Ok((items, next))
}
