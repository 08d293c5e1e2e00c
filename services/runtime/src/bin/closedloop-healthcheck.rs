//! `closedloop-healthcheck [ADDR]`: exits 0 when the gRPC server at ADDR (default
//! 127.0.0.1:50051) reports SERVING on `grpc.health.v1.Health`. For container healthchecks,
//! where no other gRPC client is installed.

use std::process::ExitCode;
use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:50051".to_owned());
    let check = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?;
        anyhow::Ok(response.into_inner().status())
    };
    match tokio::time::timeout(Duration::from_secs(5), check).await {
        Ok(Ok(ServingStatus::Serving)) => ExitCode::SUCCESS,
        Ok(Ok(status)) => {
            eprintln!("{addr}: {status:?}");
            ExitCode::FAILURE
        }
        Ok(Err(error)) => {
            eprintln!("{addr}: {error:#}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("{addr}: no answer within 5 s");
            ExitCode::FAILURE
        }
    }
}
