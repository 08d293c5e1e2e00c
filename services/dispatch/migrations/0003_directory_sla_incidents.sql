-- Issue 5: the directory, assignment, the SLA clock, incidents, feedback and remedies.

ALTER TABLE work_orders
    ADD COLUMN province               text        NOT NULL DEFAULT '',
    ADD COLUMN city                   text        NOT NULL DEFAULT '',
    ADD COLUMN influence_tier         smallint    NOT NULL DEFAULT 0,
    ADD COLUMN skill                  text        NOT NULL DEFAULT '',
    ADD COLUMN sla_state              smallint    NOT NULL DEFAULT 1,
    ADD COLUMN first_response_risk_at timestamptz,
    ADD COLUMN resolution_risk_at     timestamptz,
    ADD COLUMN first_responded_at     timestamptz,
    ADD COLUMN incident_id            uuid,
    ADD COLUMN remedy_kind            text        NOT NULL DEFAULT '',
    ADD COLUMN remedy_amount_minor    bigint      NOT NULL DEFAULT 0,
    ADD COLUMN remedy_currency        text        NOT NULL DEFAULT '',
    ADD COLUMN remedy_approved_by     text        NOT NULL DEFAULT '',
    ADD COLUMN satisfaction           smallint    NOT NULL DEFAULT 0;

-- Open work orders: the SLA watcher's scan, merging by poster, agents' load, team queues.
CREATE INDEX work_orders_open ON work_orders (tenant, team, priority, created_at)
    WHERE state IN (1, 2, 3, 4, 7);
CREATE INDEX work_orders_open_by_poster ON work_orders (tenant, poster_id, category)
    WHERE state IN (1, 2, 3, 4, 7);
CREATE INDEX work_orders_open_by_assignee ON work_orders (tenant, assignee)
    WHERE state IN (1, 2, 3, 4, 7) AND assignee <> '';
CREATE INDEX work_orders_resolved ON work_orders (resolved_at) WHERE state = 5;
CREATE INDEX work_orders_incident ON work_orders (incident_id) WHERE incident_id IS NOT NULL;

CREATE TABLE teams (
    tenant      text   NOT NULL,
    team_id     text   NOT NULL,
    name        text   NOT NULL DEFAULT '',
    region      text   NOT NULL DEFAULT '',
    skills      text[] NOT NULL DEFAULT '{}',
    supervisors text[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (tenant, team_id)
);

CREATE TABLE agents (
    tenant                text        NOT NULL,
    agent_id              text        NOT NULL,
    team_id               text        NOT NULL,
    display_name          text        NOT NULL DEFAULT '',
    skills                text[]      NOT NULL DEFAULT '{}',
    capacity              integer     NOT NULL DEFAULT 10,
    online                boolean     NOT NULL DEFAULT false,
    authority_limit_minor bigint      NOT NULL DEFAULT 0,
    supervisor            boolean     NOT NULL DEFAULT false,
    -- Round-robin among equally loaded agents: the longest-waiting goes first.
    last_assigned_at      timestamptz NOT NULL DEFAULT 'epoch',
    PRIMARY KEY (tenant, agent_id)
);

CREATE INDEX agents_by_team ON agents (tenant, team_id);

-- High-influence posters keep their account manager.
CREATE TABLE account_managers (
    tenant    text NOT NULL,
    poster_id text NOT NULL,
    agent_id  text NOT NULL,
    PRIMARY KEY (tenant, poster_id)
);

-- Arrivals by category and region: the baseline incidents are measured against.
CREATE TABLE arrivals (
    tenant      text        NOT NULL,
    category    text        NOT NULL,
    region      text        NOT NULL,
    arrived_at  timestamptz NOT NULL
);

CREATE INDEX arrivals_by_key ON arrivals (tenant, category, region, arrived_at);

CREATE TABLE incidents (
    incident_id uuid PRIMARY KEY,
    tenant      text        NOT NULL,
    category    text        NOT NULL,
    region      text        NOT NULL,
    summary     text        NOT NULL,
    opened_at   timestamptz NOT NULL,
    resolved_at timestamptz
);

-- At most one open incident per category and region.
CREATE UNIQUE INDEX incidents_open ON incidents (tenant, category, region) WHERE resolved_at IS NULL;

-- Feedback events already applied: a redelivered answer changes nothing.
CREATE TABLE feedback_seen (
    feedback_id text PRIMARY KEY,
    seen_at     timestamptz NOT NULL DEFAULT now()
);
