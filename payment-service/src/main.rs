use clap::Parser;

#[tokio::main]
async fn main() {
    let telemetry = service_kit::telemetry::init("payment-service");
    let settings = payment_service::Settings::parse();
    let result =
        payment_service::run(settings, service_kit::shutdown::Shutdown::on_signals()).await;
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
