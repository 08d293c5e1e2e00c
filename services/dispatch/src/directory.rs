//! The directory: teams and agents per tenant, seeded from the policy file at start and
//! managed through `DirectoryService`. Reads are open to every desk role; changes need a
//! supervisor or admin (an agent may set only their own status).

use closedloop_proto::v1::directory_service_server::DirectoryService;
use closedloop_proto::v1::*;
use closedloop_runtime::auth::{Principal, Role, principal};
use closedloop_runtime::grpc::{Violation, invalid_argument};
use sqlx::{PgPool, Row};
use tonic::{Request, Response, Status};

use crate::placement;
use crate::settings::TenantDirectory;
use crate::store::{Db, OPEN_STATES_SQL, StoreError};

pub const SERVICE_NAME: &str = "closedloop.v1.DirectoryService";
const MAX_ID_CHARS: usize = 128;
const MAX_SKILLS: usize = 32;
const MAX_CAPACITY: i32 = 1_000;

pub async fn upsert_team(pool: &PgPool, tenant: &str, team: &Team) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO teams (tenant, team_id, name, region, skills, supervisors) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (tenant, team_id) DO UPDATE SET name = $3, region = $4, skills = $5, supervisors = $6",
    )
    .bind(tenant)
    .bind(&team.team_id)
    .bind(&team.name)
    .bind(&team.region)
    .bind(&team.skills)
    .bind(&team.supervisors)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn upsert_agent(pool: &PgPool, tenant: &str, agent: &Agent) -> Result<(), sqlx::Error> {
    // A new row counts work already assigned to this id (an agent added back).
    sqlx::query(&format!(
        "INSERT INTO agents (tenant, agent_id, team_id, display_name, skills, capacity, online, authority_limit_minor, supervisor, open_load) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, (SELECT count(*) FROM work_orders w WHERE w.tenant = $1 \
           AND w.assignee = $2 AND w.assignee <> '' AND w.state IN {OPEN_STATES_SQL})) ON CONFLICT (tenant, agent_id) DO UPDATE SET team_id = $3, \
         display_name = $4, skills = $5, capacity = $6, online = $7, authority_limit_minor = $8, supervisor = $9"
    ))
    .bind(tenant)
    .bind(&agent.agent_id)
    .bind(&agent.team_id)
    .bind(&agent.display_name)
    .bind(&agent.skills)
    .bind(agent.capacity)
    .bind(agent.online)
    .bind(agent.authority_limit_minor)
    .bind(agent.supervisor)
    .execute(pool)
    .await?;
    Ok(())
}

fn team_from_row(row: &sqlx::postgres::PgRow) -> Result<Team, sqlx::Error> {
    Ok(closedloop_runtime::from_columns![Team; row; team_id, name, region, skills, supervisors])
}

fn agent_from_row(row: &sqlx::postgres::PgRow) -> Result<Agent, sqlx::Error> {
    Ok(closedloop_runtime::from_columns![Agent; row;
        agent_id, team_id, display_name, skills, capacity, online, authority_limit_minor, supervisor;
        open_work_orders: row.try_get("open_load")?,
    ])
}

/// Agents matching `filter`, each with the open work it holds.
fn agents_query(filter: &str) -> String {
    format!(
        "SELECT a.agent_id, a.team_id, a.display_name, a.skills, a.capacity, a.online, \
           a.authority_limit_minor, a.supervisor, a.open_load FROM agents a WHERE {filter}"
    )
}

pub async fn list_agents(pool: &PgPool, tenant: &str, team: &str) -> Result<Vec<Agent>, sqlx::Error> {
    let rows = sqlx::query(&agents_query(
        "a.tenant = $1 AND ($2 = '' OR a.team_id = $2) ORDER BY a.agent_id",
    ))
    .bind(tenant)
    .bind(team)
    .fetch_all(pool)
    .await?;
    rows.iter().map(agent_from_row).collect()
}

pub async fn get_agent(pool: &PgPool, tenant: &str, agent_id: &str) -> Result<Option<Agent>, sqlx::Error> {
    let row = sqlx::query(&agents_query("a.tenant = $1 AND a.agent_id = $2"))
        .bind(tenant)
        .bind(agent_id)
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(agent_from_row).transpose()
}

/// Upserts the policy file's directory, then hands queued work to whoever has room.
pub async fn seed(
    db: &Db,
    directories: &[TenantDirectory],
    account_manager_team: Option<&str>,
) -> Result<(), StoreError> {
    for directory in directories {
        for team in &directory.teams {
            let team = Team {
                team_id: team.team_id.clone(),
                name: team.name.clone(),
                region: team.region.clone(),
                skills: team.skills.clone(),
                supervisors: team.supervisors.clone(),
            };
            validate_team(&team).map_err(|e| {
                StoreError::Invalid(format!("directory of {}: {}", directory.tenant, e.message()))
            })?;
            upsert_team(&db.pool, &directory.tenant, &team).await?;
        }
        for agent in &directory.agents {
            let agent = Agent {
                agent_id: agent.agent_id.clone(),
                team_id: agent.team_id.clone(),
                display_name: agent.display_name.clone(),
                skills: agent.skills.clone(),
                capacity: agent.capacity,
                online: agent.online,
                authority_limit_minor: agent.authority_limit_minor,
                supervisor: agent.supervisor,
                open_work_orders: 0,
            };
            validate_agent(&agent).map_err(|e| {
                StoreError::Invalid(format!("directory of {}: {}", directory.tenant, e.message()))
            })?;
            upsert_agent(&db.pool, &directory.tenant, &agent).await?;
        }
        let mut teams: Vec<&str> = directory.agents.iter().map(|a| a.team_id.as_str()).collect();
        teams.sort_unstable();
        teams.dedup();
        for team in teams {
            placement::assign_queued(db, &directory.tenant, team, account_manager_team).await?;
        }
    }
    Ok(())
}

fn check_id(field: &str, value: &str, violations: &mut Vec<Violation>) {
    if value.trim().is_empty() {
        violations.push(Violation::new(field, "must not be empty"));
    } else if value.chars().count() > MAX_ID_CHARS || value.trim() != value {
        violations.push(Violation::new(
            field,
            format!("at most {MAX_ID_CHARS} characters, no surrounding spaces"),
        ));
    }
}

fn check_skills(field: &str, skills: &[String], violations: &mut Vec<Violation>) {
    if skills.len() > MAX_SKILLS {
        violations.push(Violation::new(field, format!("at most {MAX_SKILLS} skills")));
    }
    if skills
        .iter()
        .any(|s| s.trim().is_empty() || s.chars().count() > MAX_ID_CHARS)
    {
        violations.push(Violation::new(field, "skills must be non-empty short names"));
    }
}

fn validate_team(team: &Team) -> Result<(), Status> {
    let mut violations = Vec::new();
    check_id("team.team_id", &team.team_id, &mut violations);
    check_skills("team.skills", &team.skills, &mut violations);
    if violations.is_empty() {
        Ok(())
    } else {
        Err(invalid_argument(&violations))
    }
}

fn validate_agent(agent: &Agent) -> Result<(), Status> {
    let mut violations = Vec::new();
    check_id("agent.agent_id", &agent.agent_id, &mut violations);
    check_id("agent.team_id", &agent.team_id, &mut violations);
    check_skills("agent.skills", &agent.skills, &mut violations);
    if !(0..=MAX_CAPACITY).contains(&agent.capacity) {
        violations.push(Violation::new("agent.capacity", format!("0 to {MAX_CAPACITY}")));
    }
    if agent.authority_limit_minor < 0 {
        violations.push(Violation::new(
            "agent.authority_limit_minor",
            "must not be negative",
        ));
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(invalid_argument(&violations))
    }
}

fn database(error: impl std::fmt::Display) -> Status {
    tracing::error!(error = %error, "directory database error");
    Status::unavailable("directory store unavailable; retry")
}

pub struct DirectoryApi {
    pub db: Db,
    /// The policy's account-manager team, whose queue goes to posters' managers.
    pub account_manager_team: Option<String>,
}

fn manager(request: &Request<impl Sized>) -> Result<Principal, Status> {
    let caller = principal(request)?;
    caller.require_any(&[Role::Supervisor])?;
    Ok(caller)
}

fn reader(request: &Request<impl Sized>) -> Result<Principal, Status> {
    let caller = principal(request)?;
    caller.require_any(&[Role::Agent, Role::Supervisor, Role::Viewer])?;
    Ok(caller)
}

impl DirectoryApi {
    async fn agent(&self, tenant: &str, agent_id: &str) -> Result<Agent, Status> {
        get_agent(&self.db.pool, tenant, agent_id)
            .await
            .map_err(database)?
            .ok_or_else(|| Status::not_found(format!("no agent {agent_id:?} in this tenant")))
    }
}

#[tonic::async_trait]
impl DirectoryService for DirectoryApi {
    async fn upsert_team(
        &self,
        request: Request<UpsertTeamRequest>,
    ) -> Result<Response<UpsertTeamResponse>, Status> {
        let caller = manager(&request)?;
        let team = request
            .into_inner()
            .team
            .ok_or_else(|| invalid_argument(&[Violation::new("team", "is required")]))?;
        validate_team(&team)?;
        upsert_team(&self.db.pool, &caller.tenant, &team)
            .await
            .map_err(database)?;
        Ok(Response::new(UpsertTeamResponse { team: Some(team) }))
    }

    async fn list_teams(
        &self,
        request: Request<ListTeamsRequest>,
    ) -> Result<Response<ListTeamsResponse>, Status> {
        let caller = reader(&request)?;
        let rows = sqlx::query(
            "SELECT team_id, name, region, skills, supervisors FROM teams WHERE tenant = $1 ORDER BY team_id",
        )
        .bind(&caller.tenant)
        .fetch_all(&self.db.pool)
        .await
        .map_err(database)?;
        let teams = rows
            .iter()
            .map(team_from_row)
            .collect::<Result<_, _>>()
            .map_err(database)?;
        Ok(Response::new(ListTeamsResponse { teams }))
    }

    async fn upsert_agent(
        &self,
        request: Request<UpsertAgentRequest>,
    ) -> Result<Response<UpsertAgentResponse>, Status> {
        let caller = manager(&request)?;
        let agent = request
            .into_inner()
            .agent
            .ok_or_else(|| invalid_argument(&[Violation::new("agent", "is required")]))?;
        validate_agent(&agent)?;
        upsert_agent(&self.db.pool, &caller.tenant, &agent)
            .await
            .map_err(database)?;
        placement::offer_queue(
            &self.db,
            &caller.tenant,
            &agent.team_id,
            self.account_manager_team.as_deref(),
        )
        .await;
        let agent = self.agent(&caller.tenant, &agent.agent_id).await?;
        Ok(Response::new(UpsertAgentResponse { agent: Some(agent) }))
    }

    async fn list_agents(
        &self,
        request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        let caller = reader(&request)?;
        let team = request.into_inner().team_id;
        let agents = list_agents(&self.db.pool, &caller.tenant, &team)
            .await
            .map_err(database)?;
        Ok(Response::new(ListAgentsResponse { agents }))
    }

    async fn set_agent_status(
        &self,
        request: Request<SetAgentStatusRequest>,
    ) -> Result<Response<SetAgentStatusResponse>, Status> {
        let caller = principal(&request)?;
        let r = request.into_inner();
        let own = caller.name == r.agent_id && caller.require_any(&[Role::Agent]).is_ok();
        if !own {
            caller.require_any(&[Role::Supervisor])?;
        }
        let updated = sqlx::query(
            "UPDATE agents SET online = $3 WHERE tenant = $1 AND agent_id = $2 RETURNING team_id",
        )
        .bind(&caller.tenant)
        .bind(&r.agent_id)
        .bind(r.online)
        .fetch_optional(&self.db.pool)
        .await
        .map_err(database)?;
        let Some(row) = updated else {
            return Err(Status::not_found(format!(
                "no agent {:?} in this tenant",
                r.agent_id
            )));
        };
        if r.online {
            let team: String = row.try_get("team_id").map_err(database)?;
            placement::offer_queue(
                &self.db,
                &caller.tenant,
                &team,
                self.account_manager_team.as_deref(),
            )
            .await;
        }
        let agent = self.agent(&caller.tenant, &r.agent_id).await?;
        Ok(Response::new(SetAgentStatusResponse { agent: Some(agent) }))
    }
}
