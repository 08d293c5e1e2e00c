//! The complaint events several services consume, decoded with the checks every consumer of
//! them makes: present where the contract says so, and of the subject's tenant. A failed
//! check rejects (dead-letters) the event.

use async_nats::jetstream;
use closedloop_proto::v1::{Classification, Complaint, ComplaintClassified, ComplaintReceived};

use crate::consumer::{self, HandleError};

/// The complaint a `complaint.received` event carries.
pub fn received(message: &jetstream::Message) -> Result<Complaint, HandleError> {
    let event: ComplaintReceived = consumer::decode(message)?;
    let complaint = event
        .complaint
        .ok_or_else(|| HandleError::reject("complaint.received without a complaint"))?;
    consumer::check_tenant(message, &complaint.tenant)?;
    Ok(complaint)
}

/// The complaint and its classification a `complaint.classified` event carries.
pub fn classified(message: &jetstream::Message) -> Result<(Complaint, Classification), HandleError> {
    let event: ComplaintClassified = consumer::decode(message)?;
    let (Some(complaint), Some(classification)) = (event.complaint, event.classification) else {
        return Err(HandleError::reject(
            "complaint.classified without complaint or classification",
        ));
    };
    consumer::check_tenant(message, &complaint.tenant)?;
    Ok((complaint, classification))
}
