//! What notify does with each event it consumes: the first reply to every classified
//! complaint, the first-response watchdog, customer messages and staff alerts for
//! work-order changes, and incident alerts.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use chrono::Utc;
use closedloop_proto::v1::{
    Complaint, Delivery, IncidentOpened, NotificationKind, WorkOrder, WorkOrderEvent, WorkOrderEventKind,
};
use closedloop_runtime::bus;
use closedloop_runtime::consumer::{self, HandleError, MessageHandler};
use closedloop_runtime::{ids, time};

use crate::courier::{Courier, Outgoing, Rule, StaffAlert, claim_error};
use crate::gateway::Destination;
use crate::templates::{TemplateKey, kind_key};

/// Short reference the customer can quote: the first 8 characters of the complaint id.
fn reference(complaint_id: &str) -> &str {
    complaint_id.get(..8).unwrap_or(complaint_id)
}

/// The first reply to a complaint, whichever path sends it: one id per complaint.
fn first_reply_id(tenant: &str, complaint_id: &str) -> uuid::Uuid {
    ids::derive("delivery", &["first-reply", tenant, complaint_id])
}

fn poster_id(poster: Option<&closedloop_proto::v1::Poster>) -> String {
    poster.map(|p| p.poster_id.clone()).unwrap_or_default()
}

/// The first reply to `complaint`, of `kind` from the template for `category`: one delivery
/// id per complaint, whichever path sends it.
fn first_reply<'a>(
    courier: &Courier,
    complaint: &'a Complaint,
    kind: NotificationKind,
    category: &str,
    rule: Rule,
) -> Result<Outgoing<'a>, HandleError> {
    let key = TemplateKey {
        tenant: &complaint.tenant,
        kind,
        channel: complaint.channel(),
        category,
        locale: &complaint.locale,
    };
    let body = courier.render(&key, &[("reference", reference(&complaint.complaint_id))])?;
    let delivery = Delivery {
        delivery_id: first_reply_id(&complaint.tenant, &complaint.complaint_id).to_string(),
        tenant: complaint.tenant.clone(),
        kind: kind as i32,
        channel: complaint.channel,
        recipient: poster_id(complaint.poster.as_ref()),
        complaint_id: complaint.complaint_id.clone(),
        body,
        ..Default::default()
    };
    Ok(Outgoing {
        delivery,
        destination: Destination::Customer(complaint.channel()),
        reply_to_message_id: &complaint.channel_message_id,
        thread_id: &complaint.thread_id,
        work_order_version: None,
        received_at: complaint.received_at.as_ref().and_then(time::from_timestamp),
        rule,
    })
}

/// Acknowledges each classified complaint (or invites the customer to a private channel).
pub(crate) struct ClassifiedHandler(pub Arc<Courier>);

impl MessageHandler for ClassifiedHandler {
    async fn handle(&self, message: &jetstream::Message) -> Result<(), HandleError> {
        let (complaint, classification) = closedloop_runtime::events::classified(message)?;
        let kind = if classification.needs_private_channel {
            NotificationKind::PrivateChannelInvitation
        } else {
            NotificationKind::Acknowledgement
        };
        let out = first_reply(
            &self.0,
            &complaint,
            kind,
            &classification.category,
            Rule::of(message),
        )?;
        self.0.deliver(out).await?;
        // Delivered now or handled before: either way its record says so.
        self.0
            .first_replies
            .remember(first_reply_id(&complaint.tenant, &complaint.complaint_id));
        Ok(())
    }
}

/// The first-response watchdog: sees each received complaint at its deadline (its consumer
/// reads that far behind) and acknowledges it unless the classified path did. One seen
/// early, by a clock that disagrees, goes back to JetStream until due.
pub(crate) struct WatchdogHandler {
    pub courier: Arc<Courier>,
    pub deadline: Duration,
}

impl MessageHandler for WatchdogHandler {
    async fn handle(&self, message: &jetstream::Message) -> Result<(), HandleError> {
        let complaint = closedloop_runtime::events::received(message)?;
        let first_reply_id = first_reply_id(&complaint.tenant, &complaint.complaint_id);
        if self.courier.first_replies.contains(&first_reply_id) {
            tracing::debug!(complaint_id = %complaint.complaint_id, "first reply already in the log");
            return Ok(());
        }
        let received = complaint
            .received_at
            .as_ref()
            .and_then(time::from_timestamp)
            .unwrap_or_else(Utc::now);
        let due = received + chrono::Duration::from_std(self.deadline).unwrap_or_default();
        if let Ok(wait) = (due - Utc::now()).to_std()
            && !wait.is_zero()
        {
            return Err(HandleError::Wait(
                wait,
                anyhow::anyhow!("first-response deadline not reached"),
            ));
        }
        let mut out = first_reply(
            &self.courier,
            &complaint,
            NotificationKind::Acknowledgement,
            "*",
            Rule::OnlyIfNew,
        )?;
        out.received_at = Some(received);
        self.courier.deliver(out).await
    }
}

/// Customer messages and staff alerts for work-order changes.
pub(crate) struct WorkOrderHandler(pub Arc<Courier>);

/// The work-order events someone is told about; notify's consumer asks JetStream for these
/// alone. A kind [`WorkOrderHandler`] learns to act on must be added here: the others, such
/// as `created` (one per complaint, answered by the first reply instead), are not worth a
/// delivery each.
const TOLD_WORK_ORDER_EVENTS: [WorkOrderEventKind; 9] = [
    WorkOrderEventKind::Assigned,
    WorkOrderEventKind::Reassigned,
    WorkOrderEventKind::Accepted,
    WorkOrderEventKind::Replied,
    WorkOrderEventKind::Resolved,
    WorkOrderEventKind::Reopened,
    WorkOrderEventKind::Escalated,
    WorkOrderEventKind::SlaAtRisk,
    WorkOrderEventKind::SlaBreached,
];

/// Subject filters for [`TOLD_WORK_ORDER_EVENTS`], every tenant.
pub(crate) fn told_work_order_subjects() -> Vec<String> {
    TOLD_WORK_ORDER_EVENTS
        .iter()
        .map(|kind| bus::work_order_event_topic(*kind).all_tenants())
        .collect()
}

/// What notify tells about one work-order event: the work order and, for a replayed event,
/// that even messages refused before are tried again.
struct Telling<'a> {
    courier: &'a Courier,
    work_order: &'a WorkOrder,
    rule: Rule,
}

impl Telling<'_> {
    /// A message to the customer about the work order at its current version.
    async fn tell_customer(
        &self,
        kind: NotificationKind,
        values: &[(&str, &str)],
    ) -> Result<(), HandleError> {
        let work_order = self.work_order;
        let channel = work_order.channel();
        let key = TemplateKey {
            tenant: &work_order.tenant,
            kind,
            channel,
            category: &work_order.category,
            locale: &work_order.locale,
        };
        let mut values = values.to_vec();
        values.push(("reference", reference(&work_order.complaint_id)));
        let body = self.courier.render(&key, &values)?;
        let version = work_order.version.to_string();
        let delivery = Delivery {
            delivery_id: ids::derive("delivery", &[kind_key(kind), &work_order.work_order_id, &version])
                .to_string(),
            tenant: work_order.tenant.clone(),
            kind: kind as i32,
            channel: work_order.channel,
            recipient: poster_id(work_order.poster.as_ref()),
            complaint_id: work_order.complaint_id.clone(),
            work_order_id: work_order.work_order_id.clone(),
            body,
            ..Default::default()
        };
        let out = Outgoing {
            delivery,
            destination: Destination::Customer(channel),
            reply_to_message_id: &work_order.channel_message_id,
            thread_id: &work_order.thread_id,
            work_order_version: Some(work_order.version),
            received_at: None,
            rule: self.rule,
        };
        self.courier.deliver(out).await
    }

    /// A status update, unless the customer already heard of a newer version.
    async fn status_update(&self, status: &str) -> Result<(), HandleError> {
        let work_order = self.work_order;
        let told = self
            .courier
            .claims
            .told(&work_order.work_order_id)
            .await
            .map_err(claim_error)?;
        if told >= work_order.version {
            tracing::info!(work_order_id = %work_order.work_order_id, version = work_order.version, told, "stale status update not sent");
            return Ok(());
        }
        self.tell_customer(NotificationKind::StatusUpdate, &[("status", status)])
            .await
    }

    async fn alert_about(&self, event: &str, detail: &str) -> Result<(), HandleError> {
        let work_order = self.work_order;
        let alert = StaffAlert {
            tenant: &work_order.tenant,
            event,
            subject_id: &work_order.work_order_id,
            version: work_order.version,
            values: [
                ("work_order", work_order.work_order_id.as_str()),
                ("priority", work_order.priority().label()),
                ("category", work_order.category.as_str()),
                ("team", work_order.team.as_str()),
                ("assignee", work_order.assignee.as_str()),
                ("region", ""),
                ("detail", detail),
            ],
            recipient: if work_order.assignee.is_empty() {
                &work_order.team
            } else {
                &work_order.assignee
            },
            complaint_id: &work_order.complaint_id,
            rule: self.rule,
        };
        self.courier.alert_staff(alert).await
    }
}

/// Alerts staff to an incident (a spike of one category in one region).
pub(crate) struct IncidentHandler(pub Arc<Courier>);

impl MessageHandler for IncidentHandler {
    async fn handle(&self, message: &jetstream::Message) -> Result<(), HandleError> {
        let incident: IncidentOpened = consumer::decode(message)?;
        consumer::check_tenant(message, &incident.tenant)?;
        let count = incident.complaint_count.to_string();
        let alert = StaffAlert {
            tenant: &incident.tenant,
            event: "incident",
            subject_id: &incident.incident_id,
            version: 1,
            values: [
                ("work_order", ""),
                ("priority", "P1"),
                ("category", incident.category.as_str()),
                ("team", ""),
                ("assignee", ""),
                ("region", incident.region.as_str()),
                ("detail", incident.summary.as_str()),
            ],
            recipient: "supervisors",
            complaint_id: "",
            rule: Rule::of(message),
        };
        tracing::info!(incident_id = %incident.incident_id, %count, "incident alert");
        self.0.alert_staff(alert).await
    }
}

impl MessageHandler for WorkOrderHandler {
    async fn handle(&self, message: &jetstream::Message) -> Result<(), HandleError> {
        let event: WorkOrderEvent = consumer::decode(message)?;
        let work_order = event
            .work_order
            .as_ref()
            .ok_or_else(|| HandleError::reject("workorder event without a work order"))?;
        consumer::check_tenant(message, &work_order.tenant)?;
        let telling = Telling {
            courier: &self.0,
            work_order,
            rule: Rule::of(message),
        };
        match event.kind() {
            WorkOrderEventKind::Assigned | WorkOrderEventKind::Reassigned => {
                // The customer first: nothing a customer is owed waits on the staff webhook.
                telling.status_update("assigned").await?;
                telling.alert_about("assigned", &event.note).await
            }
            WorkOrderEventKind::Accepted => telling.status_update("in_progress").await,
            WorkOrderEventKind::Replied => {
                telling
                    .tell_customer(NotificationKind::AgentReply, &[("reply", &event.note)])
                    .await
            }
            WorkOrderEventKind::Resolved => {
                // The agent's note only on private channels: it may name the customer's case.
                let note = if closedloop_runtime::pii::is_public_channel(work_order.channel()) {
                    ""
                } else {
                    work_order.resolution_note.as_str()
                };
                telling
                    .tell_customer(NotificationKind::Closure, &[("note", note)])
                    .await?;
                telling
                    .tell_customer(NotificationKind::SatisfactionSurvey, &[])
                    .await
            }
            WorkOrderEventKind::Reopened => telling.tell_customer(NotificationKind::Reopened, &[]).await,
            WorkOrderEventKind::Escalated => telling.alert_about("escalated", &event.note).await,
            WorkOrderEventKind::SlaAtRisk => telling.alert_about("sla_at_risk", &event.note).await,
            WorkOrderEventKind::SlaBreached => telling.alert_about("sla_breached", &event.note).await,
            _ => Ok(()),
        }
    }
}
