#[tokio::main]
async fn main() {
    service_kit::process::main("saga-monitor", saga_monitor::run).await
}
