//! Durations as people write them in flags and environment variables: `500ms`, `30s`, `2m`,
//! `24h`, `7d`.

use std::time::Duration;

/// Parses one duration such as `500ms`, `30s`, `2m`, `24h` or `7d`.
pub fn parse(text: &str) -> Result<Duration, String> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| text.split_at(i))
        .ok_or_else(|| format!("{text:?} needs a unit: ms, s, m, h or d"))?;
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a whole number and a unit"))?;
    let seconds_per = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?}; use ms, s, m, h or d"
            ));
        }
    };
    n.checked_mul(seconds_per)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_their_unit() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse("24h"), Ok(Duration::from_secs(86_400)));
        assert!(parse("10").is_err());
        assert!(parse("1w").is_err());
        assert!(parse("999999999999999999m").is_err());
    }
}
