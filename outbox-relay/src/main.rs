#[tokio::main]
async fn main() {
    service_kit::process::main("outbox-relay", outbox_relay::run).await
}
