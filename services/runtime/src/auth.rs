//! Bearer-token authentication for every gRPC API.
//!
//! Operators configure only SHA-256 hashes of tokens, each scoped to one tenant and a set of
//! roles. Tokens are long random strings, so an unsalted hash is enough to keep a leaked
//! config from granting access. The interceptor puts the caller's [`Principal`] into the
//! request extensions; handlers take the tenant from it, never from the request body.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tonic::{Request, Status};

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Channel gateways: submit complaints and feedback.
    Gateway,
    /// Agent desks: read and work on work orders.
    Agent,
    /// Supervisors: everything an agent does, plus approvals and escalations.
    Supervisor,
    /// Operators and CRMs: read everything of the tenant.
    Viewer,
    /// Everything.
    Admin,
}

impl FromStr for Role {
    type Err = TokenTableError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "gateway" => Ok(Role::Gateway),
            "agent" => Ok(Role::Agent),
            "supervisor" => Ok(Role::Supervisor),
            "viewer" => Ok(Role::Viewer),
            "admin" => Ok(Role::Admin),
            other => Err(TokenTableError::UnknownRole(other.to_owned())),
        }
    }
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The only tenant whose data this caller sees.
    pub tenant: String,
    pub roles: Vec<Role>,
    /// Who the caller is, for audit trails (an agent id, a gateway name).
    pub name: String,
}

impl Principal {
    /// `PERMISSION_DENIED` unless the caller holds one of `roles` (admin holds all).
    pub fn require_any(&self, roles: &[Role]) -> Result<(), Status> {
        if self.roles.contains(&Role::Admin) || roles.iter().any(|r| self.roles.contains(r)) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "this call needs one of the roles {roles:?}"
            )))
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenTableError {
    #[error("token entry {0:?} is not `tenant:roles:sha256hex[:name]`")]
    Malformed(String),
    #[error("unknown role {0:?}")]
    UnknownRole(String),
    #[error("tenant {0:?} must be 1-64 characters of a-z, 0-9, '-' or '_'")]
    BadTenant(String),
    #[error("token hash {0:?} is not 64 hex characters")]
    BadHash(String),
}

/// Accepted tokens by their SHA-256.
#[derive(Clone, Default)]
pub struct TokenTable {
    by_hash: Arc<HashMap<[u8; 32], Principal>>,
}

impl fmt::Debug for TokenTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenTable({} tokens)", self.by_hash.len())
    }
}

/// The `tenant=value` entries of a per-tenant setting, separated by `;` or new lines, each
/// with its tenant checked. An entry that is not one is named by what precedes its `=`,
/// never by its value, which may be a secret.
pub fn tenant_entries(setting: &str) -> impl Iterator<Item = Result<(&str, &str), String>> {
    setting
        .split([';', '\n'])
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            entry
                .split_once('=')
                .map(|(tenant, value)| (tenant.trim(), value.trim()))
                .filter(|(tenant, _)| valid_tenant(tenant))
                .ok_or_else(|| entry.split('=').next().unwrap_or_default().trim().to_owned())
        })
}

/// A per-tenant setting read into a map: each entry's value by `parse` (given the tenant and
/// the value). An entry without a valid tenant is refused with `malformed` of what stands
/// for its tenant; a later entry for a tenant replaces an earlier one.
pub fn tenant_map<T, E>(
    setting: &str,
    malformed: impl Fn(String) -> E,
    parse: impl Fn(&str, &str) -> Result<T, E>,
) -> Result<HashMap<String, T>, E> {
    tenant_entries(setting)
        .map(|entry| {
            let (tenant, value) = entry.map_err(&malformed)?;
            Ok((tenant.to_owned(), parse(tenant, value)?))
        })
        .collect()
}

/// A request carrying `authorization: Bearer <token>`, as a client of the services sends
/// it (a token that is not a valid header value is left out, and the call is refused).
pub fn authed<T>(token: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    if let Ok(value) = format!("Bearer {token}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// Whether a tenant name is safe as a NATS subject token and a database value.
pub fn valid_tenant(tenant: &str) -> bool {
    !tenant.is_empty()
        && tenant.len() <= 64
        && tenant
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Hex SHA-256 of a token: what goes into `CLOSEDLOOP_AUTH_TOKENS`.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl FromStr for TokenTable {
    type Err = TokenTableError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut by_hash = HashMap::new();
        for entry in s.split([';', '\n']).map(str::trim).filter(|e| !e.is_empty()) {
            let fields: Vec<&str> = entry.split(':').collect();
            if !(3..=4).contains(&fields.len()) {
                return Err(TokenTableError::Malformed(entry.to_owned()));
            }
            let tenant = fields[0].trim();
            if !valid_tenant(tenant) {
                return Err(TokenTableError::BadTenant(tenant.to_owned()));
            }
            let roles = fields[1]
                .split(',')
                .map(Role::from_str)
                .collect::<Result<Vec<_>, _>>()?;
            let mut hash = [0u8; 32];
            hex::decode_to_slice(fields[2].trim(), &mut hash)
                .map_err(|_| TokenTableError::BadHash(fields[2].to_owned()))?;
            let name = fields.get(3).map_or(tenant, |n| n.trim()).to_owned();
            by_hash.insert(
                hash,
                Principal {
                    tenant: tenant.to_owned(),
                    roles,
                    name,
                },
            );
        }
        Ok(TokenTable {
            by_hash: Arc::new(by_hash),
        })
    }
}

impl TokenTable {
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
    fn lookup(&self, token: &str) -> Option<&Principal> {
        self.by_hash.get(Sha256::digest(token.as_bytes()).as_slice())
    }
}

/// The tonic interceptor in front of every Closedloop service.
#[derive(Clone, Debug)]
pub struct Authenticator {
    tokens: TokenTable,
}

impl Authenticator {
    pub fn new(tokens: TokenTable) -> Self {
        Self { tokens }
    }
}

impl Authenticator {
    /// The caller behind an `authorization` header value (`Bearer <token>`); used by the
    /// gRPC interceptor and by HTTP endpoints alike.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, Status> {
        let header = authorization
            .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <token>`"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <token>`"))?;
        self.tokens
            .lookup(token.trim())
            .cloned()
            .ok_or_else(|| Status::unauthenticated("unknown token"))
    }
}

impl tonic::service::Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let header = request.metadata().get("authorization").map(|v| v.to_str());
        let header = match header {
            Some(Err(_)) => return Err(Status::unauthenticated("authorization header is not ASCII")),
            Some(Ok(value)) => Some(value),
            None => None,
        };
        let principal = self.authenticate(header)?;
        request.extensions_mut().insert(principal);
        Ok(request)
    }
}

/// The caller of a request that passed the [`Authenticator`].
pub fn principal<T>(request: &Request<T>) -> Result<Principal, Status> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("request was not authenticated"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_entries_name_a_bad_entry_without_its_value() {
        let entries: Vec<_> = tenant_entries(" acme = a|b ;\nbeta=c; ;").collect();
        assert_eq!(entries, [Ok(("acme", "a|b")), Ok(("beta", "c"))]);
        let bad: Vec<_> = tenant_entries("Bad Tenant=secret;nokey").collect();
        assert_eq!(bad, [Err("Bad Tenant".to_owned()), Err("nokey".to_owned())]);
    }

    #[test]
    fn tenant_maps_read_each_value_and_refuse_the_first_bad_entry() {
        let number =
            |tenant: &str, value: &str| value.parse::<u32>().map_err(|_| format!("{tenant}: {value}"));
        let map = tenant_map("acme=1; beta=2; acme=3", |name| name, number).expect("valid");
        assert_eq!(map.get("acme"), Some(&3), "the later entry stands");
        assert_eq!(map.get("beta"), Some(&2));
        assert_eq!(
            tenant_map("acme=x", |name| name, number),
            Err("acme: x".to_owned())
        );
        assert_eq!(tenant_map("Acme=1", |name| name, number), Err("Acme".to_owned()));
        assert_eq!(tenant_map("", |name| name, number), Ok(HashMap::new()));
    }
    use tonic::service::Interceptor;

    fn table() -> TokenTable {
        format!(
            "acme:gateway,agent:{}:desk-1; beta:viewer:{}",
            hash_token("secret-a"),
            hash_token("secret-b")
        )
        .parse()
        .expect("valid table")
    }

    #[test]
    fn parses_entries_and_finds_principals_by_token() {
        let table = table();
        assert_eq!(table.len(), 2);
        let acme = table.lookup("secret-a").expect("known token");
        assert_eq!(acme.tenant, "acme");
        assert_eq!(acme.roles, vec![Role::Gateway, Role::Agent]);
        assert_eq!(acme.name, "desk-1");
        assert_eq!(table.lookup("secret-b").map(|p| p.name.as_str()), Some("beta"));
        assert!(table.lookup("guess").is_none());
    }

    #[test]
    fn rejects_bad_entries() {
        assert!(matches!(
            "acme:agent".parse::<TokenTable>(),
            Err(TokenTableError::Malformed(_))
        ));
        assert!(matches!(
            "ACME:agent:00".parse::<TokenTable>(),
            Err(TokenTableError::BadTenant(_))
        ));
        assert!(matches!(
            "acme:chef:00".parse::<TokenTable>(),
            Err(TokenTableError::UnknownRole(_))
        ));
        assert!(matches!(
            "acme:agent:zz".parse::<TokenTable>(),
            Err(TokenTableError::BadHash(_))
        ));
    }

    #[test]
    fn interceptor_requires_a_known_bearer_token() {
        let mut auth = Authenticator::new(table());
        let status = auth.call(Request::new(())).expect_err("no header");
        assert_eq!(status.code(), tonic::Code::Unauthenticated);

        let mut request = Request::new(());
        request
            .metadata_mut()
            .insert("authorization", "Bearer nope".parse().expect("ascii"));
        assert_eq!(
            auth.call(request).expect_err("unknown").code(),
            tonic::Code::Unauthenticated
        );

        let mut request = Request::new(());
        request
            .metadata_mut()
            .insert("authorization", "Bearer secret-a".parse().expect("ascii"));
        let request = auth.call(request).expect("known token");
        let caller = principal(&request).expect("principal set");
        assert_eq!(caller.tenant, "acme");
        assert!(caller.require_any(&[Role::Agent]).is_ok());
        assert_eq!(
            caller
                .require_any(&[Role::Supervisor])
                .expect_err("not a supervisor")
                .code(),
            tonic::Code::PermissionDenied
        );
    }
}
