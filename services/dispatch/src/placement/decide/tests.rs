//! `decide` over hand-built snapshots: no database.

use chrono::Duration;
use closedloop_proto::v1::{
    Classification, Complaint, IncidentOpened, InfluenceTier, Intent, Poster, Priority, WorkOrderState,
};
use prost::Message;

use super::*;
use crate::assignment::Candidate;
use crate::placement::incidents::ArrivalCounts;
use crate::placement::staffing::{Staff, TeamAgents};
use crate::settings::SettingsFile;

const TENANT: &str = "acme";

fn policy() -> Policy {
    Policy::from_file(&SettingsFile::load(None).expect("default settings")).expect("valid")
}

/// A classified complaint as the handler drafts it.
struct Contact {
    n: u32,
    category: &'static str,
    poster: &'static str,
    thread: &'static str,
    city: &'static str,
    tier: InfluenceTier,
}

impl Contact {
    fn new(n: u32, category: &'static str) -> Self {
        Self {
            n,
            category,
            poster: "",
            thread: "",
            city: "",
            tier: InfluenceTier::Regular,
        }
    }

    fn draft(&self, policy: &Policy, now: DateTime<Utc>) -> Draft {
        let complaint = Complaint {
            complaint_id: Uuid::from_u128(u128::from(self.n)).to_string(),
            tenant: TENANT.into(),
            thread_id: self.thread.into(),
            poster: Some(Poster {
                poster_id: self.poster.into(),
                ..Poster::default()
            }),
            ..Complaint::default()
        };
        let mut classification = Classification {
            category: self.category.into(),
            province: if self.city.is_empty() {
                String::new()
            } else {
                "Guangdong".into()
            },
            city: self.city.into(),
            masked_text: format!("complaint {}", self.n),
            ..Classification::default()
        };
        classification.set_intent(Intent::Complaint);
        classification.set_priority(Priority::P3);
        classification.set_influence_tier(self.tier);
        policy.draft(&complaint, &classification, now).expect("a UUID")
    }
}

fn agent(id: &str, skills: &[&str], load: i32, capacity: i32) -> Candidate {
    Candidate {
        agent_id: id.into(),
        skills: skills.iter().map(|s| s.to_string()).collect(),
        capacity,
        online: true,
        load,
        last_assigned_at: DateTime::UNIX_EPOCH,
    }
}

fn team(name: &str, candidates: Vec<Candidate>) -> TeamAgents {
    TeamAgents {
        tenant: TENANT.into(),
        team: name.into(),
        candidates,
    }
}

fn kinds(plan: &Plan) -> Vec<(WorkOrderEventKind, i64)> {
    plan.events
        .iter()
        .map(|e| (e.kind, e.work_order.version))
        .collect()
}

fn created(placement: &Placement) -> &WorkOrder {
    match placement {
        Placement::Created(wo) => wo,
        other => panic!("expected a new work order, got {other:?}"),
    }
}

#[test]
fn redeliveries_and_repeats_in_a_batch_are_placed_once() {
    let (policy, now) = (policy(), Utc::now());
    let drafts: Vec<Draft> = [1, 2, 2]
        .into_iter()
        .map(|n| Contact::new(n, "billing").draft(&policy, now))
        .collect();
    let snapshot = Snapshot {
        placed: HashSet::from([drafts[0].complaint]),
        ..Snapshot::default()
    };
    let plan = decide(&snapshot, &drafts, &policy, now);
    assert_eq!(plan.placements[0], Placement::AlreadyHandled);
    assert_eq!(
        created(&plan.placements[1]).complaint_id,
        drafts[1].new.work_order.complaint_id
    );
    assert_eq!(plan.placements[2], Placement::AlreadyHandled);
    assert_eq!(plan.inserts.len(), 1);
    assert_eq!(kinds(&plan), [(WorkOrderEventKind::Created, 1)]);
    assert_eq!(
        plan.arrivals,
        Vec::<IncidentKey>::new(),
        "no region, nothing to count"
    );
}

#[test]
fn follow_ups_join_their_threads_or_their_posters_open_work_order() {
    let (policy, now) = (policy(), Utc::now());
    let open = Contact {
        thread: "t-1",
        ..Contact::new(1, "outage")
    }
    .draft(&policy, now)
    .new
    .work_order;
    let drafts = vec![
        // Same thread as the open work order, another category.
        Contact {
            thread: "t-1",
            ..Contact::new(2, "billing")
        }
        .draft(&policy, now),
        // A new problem, then the same poster again about it.
        Contact {
            poster: "p-9",
            ..Contact::new(3, "refund")
        }
        .draft(&policy, now),
        Contact {
            poster: "p-9",
            ..Contact::new(4, "refund")
        }
        .draft(&policy, now),
        // Same poster, other category: a work order of its own.
        Contact {
            poster: "p-9",
            ..Contact::new(5, "delivery")
        }
        .draft(&policy, now),
    ];
    let snapshot = Snapshot {
        joinable: vec![open.clone()],
        ..Snapshot::default()
    };
    let plan = decide(&snapshot, &drafts, &policy, now);

    let Placement::Attached(joined) = &plan.placements[0] else {
        panic!("a thread follow-up joins: {:?}", plan.placements[0]);
    };
    assert_eq!(joined.work_order_id, open.work_order_id);
    assert_eq!(joined.version, open.version + 1);
    let opened = created(&plan.placements[1]).clone();
    let Placement::Attached(same) = &plan.placements[2] else {
        panic!("the poster's repeat joins: {:?}", plan.placements[2]);
    };
    assert_eq!(same.work_order_id, opened.work_order_id);
    assert_ne!(created(&plan.placements[3]).work_order_id, opened.work_order_id);

    assert_eq!(plan.updates.len(), 1, "only the work order read is updated");
    assert_eq!(plan.updates[0].work_order_id, open.work_order_id);
    assert_eq!(plan.inserts.len(), 2);
    let inserted = plan
        .inserts
        .iter()
        .find(|n| n.work_order.work_order_id == opened.work_order_id)
        .expect("inserted");
    assert_eq!(
        inserted.work_order.version, 2,
        "inserted as merged, with both events"
    );
    assert_eq!(
        plan.links,
        [
            ComplaintLink {
                tenant: TENANT.into(),
                complaint_id: drafts[0].complaint,
                work_order_id: open.work_order_id.clone(),
            },
            ComplaintLink {
                tenant: TENANT.into(),
                complaint_id: drafts[2].complaint,
                work_order_id: opened.work_order_id.clone(),
            },
        ]
    );
    let merges: Vec<&str> = plan
        .events
        .iter()
        .filter(|e| e.kind == WorkOrderEventKind::Merged)
        .map(|e| e.note.as_str())
        .collect();
    assert!(merges[0].starts_with("thread follow-up"), "{merges:?}");
    assert!(merges[1].starts_with("same poster and category"), "{merges:?}");
}

#[test]
fn new_work_goes_to_its_routed_team_least_loaded_agent_first() {
    let (policy, now) = (policy(), Utc::now());
    let drafts: Vec<Draft> = (1..=3)
        .map(|n| Contact::new(n, "network_quality").draft(&policy, now))
        .collect();
    assert!(
        drafts.iter().all(|d| d.new.work_order.team == "network-ops"),
        "routed"
    );
    let snapshot = Snapshot {
        staff: Staff {
            teams: vec![
                team(
                    "network-ops",
                    vec![
                        agent("busy", &["network"], 5, 10),
                        agent("idle", &["network"], 0, 10),
                    ],
                ),
                team("billing", vec![agent("other-team", &["billing"], 0, 10)]),
            ],
            ..Staff::default()
        },
        ..Snapshot::default()
    };
    let plan = decide(&snapshot, &drafts, &policy, now);
    let assignees: Vec<&str> = plan
        .inserts
        .iter()
        .map(|n| n.work_order.assignee.as_str())
        .collect();
    assert_eq!(assignees, ["idle"; 3], "still the least loaded after each take");
    assert!(
        plan.inserts
            .iter()
            .all(|n| n.work_order.state == WorkOrderState::Assigned)
    );
    assert_eq!(plan.staffing.assigned, 3);
    assert_eq!(plan.staffing.round_robin.len(), 1, "one entry per agent");
    assert_eq!(plan.staffing.round_robin[0].1, "idle");
    assert_eq!(
        kinds(&plan)
            .iter()
            .filter(|(k, _)| *k == WorkOrderEventKind::Assigned)
            .count(),
        3
    );
}

#[test]
fn assignment_stops_at_capacity_and_at_missing_skills() {
    let (policy, now) = (policy(), Utc::now());
    let drafts: Vec<Draft> = (1..=3)
        .map(|n| Contact::new(n, "outage").draft(&policy, now))
        .chain([Contact::new(4, "billing").draft(&policy, now)])
        .collect();
    let snapshot = Snapshot {
        staff: Staff {
            teams: vec![
                team("network-ops", vec![agent("only", &["network"], 8, 10)]),
                team("billing", vec![agent("no-skill", &["fraud"], 0, 10)]),
            ],
            ..Staff::default()
        },
        ..Snapshot::default()
    };
    let plan = decide(&snapshot, &drafts, &policy, now);
    assert_eq!(plan.staffing.assigned, 2, "two places left");
    let queued: Vec<&WorkOrder> = plan
        .inserts
        .iter()
        .map(|n| &n.work_order)
        .filter(|wo| wo.assignee.is_empty())
        .collect();
    assert_eq!(queued.len(), 2);
    assert!(queued.iter().all(|wo| wo.state == WorkOrderState::New));
    assert!(
        queued.iter().any(|wo| wo.team == "billing"),
        "billing needs the skill"
    );
}

#[test]
fn key_opinion_leaders_keep_their_account_manager_or_get_one() {
    let (policy, now) = (policy(), Utc::now());
    let leader = |n, poster| {
        Contact {
            poster,
            tier: InfluenceTier::KeyOpinionLeader,
            ..Contact::new(n, "billing")
        }
        .draft(&policy, now)
    };
    let drafts = vec![leader(1, "known"), leader(2, "new")];
    assert!(
        drafts
            .iter()
            .all(|d| d.account_managed && d.new.work_order.team == "account-managers")
    );
    let snapshot = Snapshot {
        staff: Staff {
            teams: vec![team(
                "account-managers",
                vec![agent("am-1", &[], 0, 10), agent("am-2", &[], 7, 10)],
            )],
            managers: HashMap::from([((TENANT.to_owned(), "known".to_owned()), "am-2".to_owned())]),
        },
        ..Snapshot::default()
    };
    let plan = decide(&snapshot, &drafts, &policy, now);
    assert_eq!(
        created(&plan.placements[0]).assignee,
        "am-2",
        "their manager, though busier"
    );
    assert_eq!(created(&plan.placements[1]).assignee, "am-1");
    assert_eq!(
        plan.staffing.new_managers,
        [(TENANT.to_owned(), "new".to_owned(), "am-1".to_owned())]
    );
}

#[test]
fn a_spike_opens_one_incident_that_takes_in_recent_work_instead_of_assigning_it() {
    let (policy, now) = (policy(), Utc::now());
    let key: IncidentKey = (TENANT.into(), "outage".into(), "Guangdong/Shenzhen".into());
    let earlier = Contact {
        city: "Shenzhen",
        ..Contact::new(100, "outage")
    }
    .draft(&policy, now - Duration::minutes(3))
    .new
    .work_order;
    let drafts: Vec<Draft> = (1..=3)
        .map(|n| {
            Contact {
                city: "Shenzhen",
                ..Contact::new(n, "outage")
            }
            .draft(&policy, now)
        })
        .collect();
    let staff = Staff {
        teams: vec![team("network-ops", vec![agent("a", &["network"], 0, 10)])],
        ..Staff::default()
    };
    // The default rule: at least 20 in the window. 17 before plus 3 now.
    let below = Snapshot {
        arrival_counts: HashMap::from([(
            key.clone(),
            ArrivalCounts {
                recent: 16,
                earlier: 0,
            },
        )]),
        staff: staff.clone(),
        ..Snapshot::default()
    };
    let plan = decide(&below, &drafts, &policy, now);
    assert!(
        plan.incidents.is_empty() && plan.alerts.is_empty(),
        "19 is no spike"
    );
    assert_eq!(plan.arrivals, vec![key.clone(); 3]);
    assert_eq!(plan.staffing.assigned, 3);

    let spiking = Snapshot {
        arrival_counts: HashMap::from([(
            key.clone(),
            ArrivalCounts {
                recent: 17,
                earlier: 0,
            },
        )]),
        takeable: HashMap::from([(key.clone(), vec![earlier.clone()])]),
        staff,
        ..Snapshot::default()
    };
    let plan = decide(&spiking, &drafts, &policy, now);
    assert_eq!(plan.incidents.len(), 1);
    let incident_id = plan.incidents[0].incident_id.to_string();
    assert_eq!(plan.incidents[0].key, key);
    assert!(
        plan.inserts.iter().all(
            |n| n.work_order.incident_id == Some(incident_id.clone()) && n.work_order.assignee.is_empty()
        ),
        "new work joins the incident, unassigned"
    );
    assert_eq!(plan.staffing.assigned, 0);
    assert_eq!(plan.updates.len(), 1, "the earlier work order is taken in");
    assert_eq!(plan.updates[0].incident_id.as_ref(), Some(&incident_id));
    assert!(
        plan.events
            .iter()
            .any(|e| e.kind == WorkOrderEventKind::IncidentLinked)
    );
    assert_eq!(plan.alerts.len(), 1);
    let alert = IncidentOpened::decode(plan.alerts[0].payload.clone()).expect("an alert");
    assert_eq!(
        (alert.tenant.as_str(), alert.incident_id.as_str()),
        (TENANT, incident_id.as_str())
    );
    assert_eq!(alert.complaint_count, 4, "three new and one earlier");

    // Replayed with the same inputs, the same decisions: replicas and retries agree.
    let again = decide(&spiking, &drafts, &policy, now);
    assert_eq!(again.incidents, plan.incidents);
}

#[test]
fn an_open_incident_takes_new_complaints_of_its_key() {
    let (policy, now) = (policy(), Utc::now());
    let key: IncidentKey = (TENANT.into(), "outage".into(), "Guangdong/Foshan".into());
    let drafts = vec![
        Contact {
            city: "Foshan",
            ..Contact::new(1, "outage")
        }
        .draft(&policy, now),
        Contact {
            city: "Zhuhai",
            ..Contact::new(2, "outage")
        }
        .draft(&policy, now),
    ];
    let snapshot = Snapshot {
        open_incidents: HashMap::from([(key, "inc-1".to_owned())]),
        // A spike's worth already, but an incident is open: no second one.
        arrival_counts: HashMap::from([(
            (TENANT.into(), "outage".into(), "Guangdong/Foshan".into()),
            ArrivalCounts {
                recent: 500,
                earlier: 0,
            },
        )]),
        staff: Staff {
            teams: vec![team("network-ops", vec![agent("a", &["network"], 0, 10)])],
            ..Staff::default()
        },
        ..Snapshot::default()
    };
    let plan = decide(&snapshot, &drafts, &policy, now);
    assert!(plan.incidents.is_empty());
    assert_eq!(created(&plan.placements[0]).incident_id.as_deref(), Some("inc-1"));
    assert_eq!(created(&plan.placements[0]).assignee, "");
    assert_eq!(created(&plan.placements[1]).incident_id, None);
    assert_eq!(created(&plan.placements[1]).assignee, "a");
}
