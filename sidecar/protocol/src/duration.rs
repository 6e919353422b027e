//! Rotation periods as people write them: a whole number and a unit
//! (`90d`, `12h`, `30m`, `45s`). A bare number is refused: `90` could mean
//! seconds or days, and the wrong guess rotates a key at once.

const UNITS: [(char, u64); 4] = [('d', 86_400), ('h', 3_600), ('m', 60), ('s', 1)];

/// Seconds for `90d`, `12h`, `30m`, `45s`; the error says what is wrong.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let Some(unit) = t.chars().last().filter(|c| c.is_ascii_alphabetic()) else {
        return Err(format!(
            "{text:?} has no unit: write the period as 90d, 12h, 30m or 45s"
        ));
    };
    let mult = UNITS
        .iter()
        .find(|(u, _)| *u == unit)
        .map(|(_, m)| *m)
        .ok_or_else(|| format!("{text:?}: the unit must be d, h, m or s"))?;
    let num = &t[..t.len() - 1];
    let n: u64 = num
        .parse()
        .ok()
        .filter(|_| num.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| format!("{text:?} is not a period like 90d, 12h, 30m or 45s"))?;
    n.checked_mul(mult)
        .filter(|s| *s > 0)
        .ok_or_else(|| format!("{text:?}: a period must be at least 1s and fit in 64 bits"))
}

/// `secs` in the largest unit that divides it: `90d`, `36h`, `90s`.
pub fn duration_text(secs: u64) -> String {
    UNITS
        .iter()
        .find(|(_, m)| secs > 0 && secs.is_multiple_of(*m))
        .map_or_else(|| "0s".to_string(), |(u, m)| format!("{}{u}", secs / m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_need_a_unit() {
        assert_eq!(parse_duration("90d"), Ok(90 * 86_400));
        assert_eq!(parse_duration("12h"), Ok(12 * 3_600));
        assert_eq!(parse_duration(" 30m "), Ok(1_800));
        assert_eq!(parse_duration("3s"), Ok(3));
        for bad in [
            "90",
            "0s",
            "d",
            "5w",
            "-1d",
            "+1d",
            "1.5h",
            "99999999999999999999d",
            "",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert!(parse_duration("90").expect_err("bare").contains("no unit"));
    }

    #[test]
    fn durations_read_as_durations() {
        assert_eq!(duration_text(90 * 86_400), "90d");
        assert_eq!(duration_text(36 * 3_600), "36h");
        assert_eq!(duration_text(90), "90s");
        assert_eq!(duration_text(3_600), "1h");
        assert_eq!(duration_text(0), "0s");
    }
}
