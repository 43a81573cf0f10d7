//! What a sku may be, shared by the HTTP APIs that accept one.

pub const MAX_SKU_LEN: usize = 64;

/// A sku is 1 to 64 characters of ASCII letters, digits, `-`, `_` and `.`.
pub fn validate_sku(sku: &str) -> Result<(), String> {
    if sku.is_empty() || sku.len() > MAX_SKU_LEN {
        return Err(format!(
            "must be 1 to {MAX_SKU_LEN} characters, got {}",
            sku.len()
        ));
    }
    if let Some(c) = sku
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "{sku:?} has {c:?}; only letters, digits, '-', '_' and '.' are allowed"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skus_are_short_and_plain() {
        assert!(validate_sku("SKU-1_a.b").is_ok());
        assert!(validate_sku("").is_err());
        assert!(validate_sku("has space").is_err());
        assert!(validate_sku(&"x".repeat(65)).is_err());
    }
}
