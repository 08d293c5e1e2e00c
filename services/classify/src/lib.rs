//! Classify: decides what a contact is — intent, category, sentiment, priority — masks
//! personal data, and says why. Consumes `complaint.received`, publishes
//! `complaint.classified`; `Classify` is a dry run over gRPC. Stateless and CPU-bound:
//! scale by replicas sharing one durable consumer.

pub mod calibrate;
pub mod engine;
pub mod model;
pub mod region;
pub mod rules;

use std::sync::Arc;

use async_nats::jetstream;
use closedloop_proto::v1::classify_service_server::{ClassifyService, ClassifyServiceServer};
use closedloop_proto::v1::{Channel, ClassifyRequest, ClassifyResponse, ComplaintClassified};
use closedloop_runtime::auth::{Authenticator, Role, principal};
use closedloop_runtime::bus::{self, Bus, OutgoingEvent, StreamSettings};
use closedloop_runtime::consumer::{self, ConsumerSpec, HandleError, MessageHandler};
use closedloop_runtime::grpc::{self, Violation, invalid_argument};
use closedloop_runtime::metrics;
use closedloop_runtime::service::Endpoints;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::engine::Contact;
use crate::model::SharedModels;
use crate::rules::Rules;

pub const SERVICE_NAME: &str = "closedloop.v1.ClassifyService";
/// Durable consumer shared by all classify replicas.
pub const CONSUMER: &str = "classify";

closedloop_runtime::service_config! {
    /// Closedloop classify: what each contact is and how urgent
    name = "closedloop-classify", listen = ("CLOSEDLOOP_CLASSIFY_LISTEN", "0.0.0.0:50052");
    /// Trained model file replacing the shipped one (see classify-train).
    #[arg(long, env = "CLOSEDLOOP_CLASSIFY_MODEL")]
    pub model_file: Option<String>,
    /// JSON keyword table replacing the built-in rules.
    #[arg(long, env = "CLOSEDLOOP_CLASSIFY_RULES")]
    pub rules_file: Option<String>,
    /// Longest text the dry-run `Classify` accepts, in characters.
    #[arg(long, env = "CLOSEDLOOP_MAX_TEXT_CHARS", default_value_t = 20_000)]
    pub max_text_chars: usize,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    intent: String,
    priority: String,
}

static CLASSIFIED: std::sync::LazyLock<Family<VerdictLabels, Counter>> = std::sync::LazyLock::new(|| {
    metrics::register(
        "complaints_classified",
        "Complaints classified, by intent and priority",
        Family::default(),
    )
});

/// Classifies received complaints and publishes the verdict.
struct ReceivedHandler {
    bus: Bus,
    rules: Arc<Rules>,
    models: SharedModels,
}

impl MessageHandler for ReceivedHandler {
    async fn handle(&self, message: &jetstream::Message) -> Result<(), HandleError> {
        let complaint = closedloop_runtime::events::received(message)?;
        let classification = engine::classify(
            &self.rules,
            Some(&self.models.current()),
            &Contact {
                text: &complaint.text,
                channel: complaint.channel(),
                poster: complaint.poster.as_ref(),
                region_hint: &complaint.region_hint,
            },
        );
        let labels = VerdictLabels {
            intent: classification.intent().label(),
            priority: classification.priority().label().to_owned(),
        };
        tracing::info!(
            complaint_id = %complaint.complaint_id,
            category = %classification.category,
            priority = ?classification.priority(),
            "classified"
        );
        let event = OutgoingEvent::new(
            bus::COMPLAINT_CLASSIFIED,
            &complaint.tenant,
            format!("classified:{}", complaint.complaint_id),
            &ComplaintClassified {
                complaint: Some(complaint.clone()),
                classification: Some(classification),
            },
        );
        self.bus.publish(event).await.map_err(HandleError::retry)?;
        CLASSIFIED.get_or_create(&labels).inc();
        Ok(())
    }
}

#[derive(Clone)]
struct ClassifyApi {
    rules: Arc<Rules>,
    models: SharedModels,
    max_text_chars: usize,
}

#[tonic::async_trait]
impl ClassifyService for ClassifyApi {
    async fn classify(
        &self,
        request: Request<ClassifyRequest>,
    ) -> Result<Response<ClassifyResponse>, Status> {
        principal(&request)?.require_any(&[Role::Agent, Role::Supervisor, Role::Viewer])?;
        let request = request.into_inner();
        let too_long = |text: &str| text.chars().count() > self.max_text_chars;
        // As ingest reads a contact: normalised, limits checked before and after.
        let text = if too_long(&request.text) {
            None
        } else {
            Some(closedloop_runtime::text::normalise(&request.text)).filter(|text| !too_long(text))
        };
        let Some(text) = text else {
            return Err(invalid_argument(&[Violation::new(
                "text",
                format!(
                    "must be at most {} characters, also once normalised",
                    self.max_text_chars
                ),
            )]));
        };
        if text.is_empty() {
            return Err(invalid_argument(&[Violation::new("text", "must not be empty")]));
        }
        let classification = engine::classify(
            &self.rules,
            Some(&self.models.current()),
            &Contact {
                text: &text,
                channel: Channel::try_from(request.channel).unwrap_or(Channel::Unspecified),
                poster: request.poster.as_ref(),
                region_hint: &request.region_hint,
            },
        );
        Ok(Response::new(ClassifyResponse {
            classification: Some(classification),
        }))
    }
}

/// A built classify service: connected, rules loaded, listener bound.
pub struct Classify {
    endpoints: Endpoints,
    bus: Bus,
    rules: Arc<Rules>,
    models: SharedModels,
    config: Config,
}

impl Classify {
    pub async fn build(config: Config, cancel: &CancellationToken) -> anyhow::Result<Self> {
        let rules = Arc::new(Rules::load(config.rules_file.as_deref())?);
        let models = SharedModels::load(config.model_file.clone())?;
        let bus = Bus::connect(&config.service.nats.connect, "classify", cancel).await?;
        bus.provision_streams(
            &StreamSettings::from(&config.service.nats),
            &[bus::COMPLAINTS_STREAM, bus::DEAD_LETTER_STREAM],
        )
        .await?;
        let endpoints = Endpoints::bind(config.listen, &config.service).await?;
        Ok(Self {
            endpoints,
            bus,
            rules,
            models,
            config,
        })
    }

    /// Consumes and serves until `cancel` fires, then drains in-flight work.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let spec = ConsumerSpec::new(
            bus::COMPLAINTS_STREAM,
            CONSUMER,
            vec![bus::COMPLAINT_RECEIVED.all_tenants()],
            &self.config.service.nats,
        );
        let handler = ReceivedHandler {
            bus: self.bus.clone(),
            rules: self.rules.clone(),
            models: self.models.clone(),
        };
        let consuming = consumer::spawn(&self.bus, spec, handler, &cancel);
        let exporting = self.endpoints.metrics.spawn(cancel.clone());
        let reloading = tokio::spawn(reload_on_hangup(self.models.clone(), cancel.clone()));

        let api = ClassifyApi {
            rules: self.rules,
            models: self.models,
            max_text_chars: self.config.max_text_chars,
        };
        let server = ClassifyServiceServer::new(api)
            .max_decoding_message_size(self.config.service.grpc.max_request_bytes);
        let routes = Routes::new(InterceptedService::new(
            server,
            Authenticator::new(self.config.service.grpc.auth_tokens.clone()),
        ));
        let served = grpc::serve(self.endpoints.grpc, routes, &[SERVICE_NAME], cancel.clone()).await;
        cancel.cancel();
        consuming.await?;
        exporting.await??;
        reloading.await??;
        served?;
        Ok(())
    }
}

/// Reads the model file again on every SIGHUP until `cancel` fires, so a model retrained
/// with agents' corrections takes effect without a restart. A file that cannot be read
/// leaves the models in use.
async fn reload_on_hangup(models: SharedModels, cancel: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = hangups.recv() => match models.reload() {
                Ok(trained_on) => tracing::info!(%trained_on, "models reloaded"),
                Err(error) => tracing::error!(%error, "models not reloaded; the ones in use stay"),
            },
        }
    }
}

closedloop_runtime::impl_service!(Classify, Config, "classify");
