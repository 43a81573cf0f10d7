#[tokio::main]
async fn main() {
    service_kit::process::main("inventory-service", inventory_service::run).await
}
