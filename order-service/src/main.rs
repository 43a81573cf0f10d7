use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = messaging::telemetry::init("order-service");
    let settings = order_service::Settings::parse();
    let result = order_service::run(settings, messaging::shutdown::Shutdown::on_signals()).await;
    telemetry.shutdown();
    result
}
