use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    messaging::telemetry::init_logging();
    let settings = order_service::Settings::parse();
    order_service::run(settings, messaging::shutdown::Shutdown::on_signals()).await
}
