//! `kiln.toml`, as `kiln serve --config` reads it (`kiln_config::Config::parse`): the operator's
//! file, but a typo or a stray value in it must be refused with a message, never crash the
//! server at start or resolve to something the operator did not write.
//!
//! Properties: nothing panics (overflow checks are on in fuzz builds: a size in MiB or a count
//! of days too large for its unit saturates instead of wrapping); a file that parses resolves
//! to a configuration whose checked values hold (every plan admits at least one request a
//! minute, with a compute allowance that is a number of at least 0; the stream keep-alive, the
//! token lifetime and every tenant ceiling are not zero); a size given in MiB is never fewer
//! bytes than MiB; and parsing is deterministic.
#![no_main]

use kiln_config::{Config, ServeArgs};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = Config::parse(Some(("kiln.toml", text)), &ServeArgs::default());
    let Ok(config) = parsed else {
        return;
    };
    for (name, plan) in &config.plans {
        assert!(plan.requests_per_minute >= 1, "plan {name}");
        assert!(plan.compute_hours >= 0.0, "plan {name}");
    }
    assert!(!config.stream_keepalive.is_zero());
    assert!(!config.max_token_lifetime.is_zero());
    assert!(config.tenant_uploads_per_minute >= 1);
    assert!(config.tenant_max_sessions >= 1 && config.tenant_max_threads >= 1);
    assert!(config.tenant_max_batch_size >= 1);
    // MiB options resolve to bytes: saturating, never wrapped below the MiB written.
    let table: toml::Table = toml::from_str(text).expect("parsed once already");
    let limits = table.get("limits").and_then(toml::Value::as_table);
    if let Some(mb) = limits
        .and_then(|l| l.get("memory_mb"))
        .and_then(toml::Value::as_integer)
    {
        assert!(config.limits.memory_bytes >= mb as u64, "memory_mb = {mb}");
    }
    if let Some(mb) = table
        .get("response_cache_mb")
        .and_then(toml::Value::as_integer)
    {
        assert!(
            config.response_cache_bytes >= mb as u64,
            "response_cache_mb = {mb}"
        );
    }
    let again = Config::parse(Some(("kiln.toml", text)), &ServeArgs::default())
        .expect("parsed once already");
    assert_eq!(again, config);
});
