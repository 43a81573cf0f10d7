//! What a sku may be, shared by the HTTP APIs that accept one.

pub const MAX_SKU_LEN: usize = 64;

/// Why a text is not a sku.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SkuError {
    /// Empty, or longer than [`MAX_SKU_LEN`] bytes.
    #[error("must be 1 to {MAX_SKU_LEN} characters, got {len}")]
    Length { len: usize },
    /// A character other than ASCII letters, digits, `-`, `_` and `.` (the sku is at most
    /// [`MAX_SKU_LEN`] bytes, so echoing it is bounded).
    #[error("{sku:?} has {found:?}; only letters, digits, '-', '_' and '.' are allowed")]
    Character { sku: String, found: char },
}

/// A sku is 1 to 64 characters of ASCII letters, digits, `-`, `_` and `.`.
pub fn validate_sku(sku: &str) -> Result<(), SkuError> {
    if sku.is_empty() || sku.len() > MAX_SKU_LEN {
        return Err(SkuError::Length { len: sku.len() });
    }
    if let Some(found) = sku
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(SkuError::Character {
            sku: sku.to_owned(),
            found,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skus_are_short_and_plain() {
        assert!(validate_sku("SKU-1_a.b").is_ok());
        assert_eq!(validate_sku(""), Err(SkuError::Length { len: 0 }));
        assert_eq!(
            validate_sku("has space"),
            Err(SkuError::Character {
                sku: "has space".into(),
                found: ' '
            })
        );
        assert_eq!(
            validate_sku(&"x".repeat(65)),
            Err(SkuError::Length { len: 65 })
        );
    }
}
