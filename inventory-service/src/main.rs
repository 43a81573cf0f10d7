use clap::Parser;

#[tokio::main]
async fn main() {
    let telemetry = service_kit::telemetry::init("inventory-service");
    let settings = inventory_service::Settings::parse();
    let result =
        inventory_service::run(settings, service_kit::shutdown::Shutdown::on_signals()).await;
    telemetry.shutdown();
    // Exit here rather than by returning: returning would drop the runtime, which waits for
    // any Kafka client still closing in the background (bounded in the consumer runtime).
    std::process::exit(match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("Error: {e:?}");
            1
        }
    })
}
