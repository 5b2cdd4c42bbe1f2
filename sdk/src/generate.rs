//! Building blocks of a text-generation plugin, in pure Rust: a seeded random number generator
//! ([`Rng`]), token sampling with OpenAI-style penalties ([`Sampler`]), stop sequences
//! ([`StopMatcher`]), a decoder that emits only whole UTF-8 characters ([`Utf8Decoder`]) and the
//! byte-level BPE byte mapping ([`byte_level_bytes`]).
//!
//! A plugin's `next()` typically does: logits row -> [`Sampler::sample`] -> token bytes ->
//! [`Utf8Decoder::push`] -> [`StopMatcher::push`] -> the text step. Everything here is
//! deterministic given the seed, so the same request with the same seed produces the same text.

use std::collections::HashMap;

/// A small, fast pseudo-random number generator (xoshiro256**, seeded through SplitMix64).
///
/// Not cryptographic: it only has to make sampling reproducible. The same seed always gives the
/// same stream, on every platform.
///
/// # Examples
///
/// ```
/// use kiln_sdk::generate::Rng;
///
/// let mut a = Rng::seeded(42);
/// let mut b = Rng::seeded(42);
/// assert_eq!(a.next_u64(), b.next_u64());
/// let u = a.next_f64();
/// assert!((0.0..1.0).contains(&u));
/// ```
#[derive(Debug, Clone)]
pub struct Rng {
    state: [u64; 4],
}

/// One SplitMix64 step: advances `state` and returns the next output.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// A generator whose stream is fully determined by `seed`.
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::generate::Rng;
    ///
    /// let mut a = Rng::seeded(7);
    /// let mut b = Rng::seeded(7);
    /// assert_eq!([a.next_u64(), a.next_u64()], [b.next_u64(), b.next_u64()]);
    /// assert_ne!(Rng::seeded(7).next_u64(), Rng::seeded(8).next_u64());
    /// ```
    pub fn seeded(seed: u64) -> Self {
        // SplitMix64 spreads any seed (0 included) over the 256-bit state, which must not be all
        // zeros: SplitMix64's outputs for four consecutive states never all are.
        let mut s = seed;
        Rng {
            state: [
                splitmix64(&mut s),
                splitmix64(&mut s),
                splitmix64(&mut s),
                splitmix64(&mut s),
            ],
        }
    }

    /// A generator seeded from the operating system's randomness: in a `wasm32-wasip2` plugin,
    /// `wasi:random` (through the standard library's `RandomState`, whose keys come from it),
    /// mixed with the wall clock. For requests that give no seed.
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::generate::Rng;
    ///
    /// let request_seed: Option<u64> = None;
    /// let mut rng = request_seed.map_or_else(Rng::from_entropy, Rng::seeded);
    /// assert!(rng.next_f64() < 1.0);
    /// // Two unseeded generators (almost surely) differ.
    /// assert_ne!(Rng::from_entropy().next_u64(), Rng::from_entropy().next_u64());
    /// ```
    pub fn from_entropy() -> Self {
        use std::hash::{BuildHasher, Hasher};
        // Each RandomState gets fresh keys (std seeds them from the OS once per thread, then
        // increments them), so consecutive calls differ even within the same nanosecond.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        hasher.write_u128(nanos);
        Rng::seeded(hasher.finish())
    }

    /// The next 64 random bits.
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::generate::Rng;
    ///
    /// let mut rng = Rng::seeded(1);
    /// let (x, y) = (rng.next_u64(), rng.next_u64());
    /// assert_ne!(x, y);
    /// ```
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// A uniform float in `[0, 1)`, from the top 53 bits.
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::generate::Rng;
    ///
    /// let mut rng = Rng::seeded(3);
    /// let heads = (0..10_000).filter(|_| rng.next_f64() < 0.5).count();
    /// assert!((4_500..5_500).contains(&heads));
    /// ```
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// How to pick each token: the sampling parameters of a request (OpenAI's meanings).
///
/// # Examples
///
/// ```
/// use kiln_sdk::generate::SamplingParams;
///
/// // Typical chat settings; everything else as the default (no penalties).
/// let params = SamplingParams {
///     temperature: 0.7,
///     top_p: 0.9,
///     seed: Some(42),
///     ..SamplingParams::default()
/// };
/// assert_eq!(params.top_k, 0);
/// // The default is greedy decoding.
/// assert_eq!(SamplingParams::default().temperature, 0.0);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Divides the logits; `0.0` is greedy decoding (argmax, ties to the lowest id).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` disables it.
    pub top_k: u32,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probabilities add up
    /// to at least `top_p` (always at least one); `1.0` disables it.
    pub top_p: f32,
    /// Subtracted from a token's logit once per time it was generated already.
    pub frequency_penalty: f32,
    /// Subtracted from a token's logit if it was generated at least once already.
    pub presence_penalty: f32,
    /// The random stream's seed; `None` seeds from the OS ([`Rng::from_entropy`]).
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    /// Greedy decoding, no penalties.
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
        }
    }
}

/// Picks tokens from logits: penalties, then temperature, top-k, top-p, then a draw.
///
/// It remembers how often it generated each token (for the penalties): call [`Sampler::sample`]
/// once per generated token, and only for generated tokens (the prompt is not counted, as in
/// OpenAI's API).
///
/// # Examples
///
/// ```
/// use kiln_sdk::generate::{Sampler, SamplingParams};
///
/// let mut sampler = Sampler::new(SamplingParams {
///     temperature: 0.8,
///     top_k: 40,
///     top_p: 0.95,
///     seed: Some(1234),
///     ..SamplingParams::default()
/// });
/// // One logits row per step (the model's vocabulary is 4 tokens here).
/// let row = [0.1, 2.5, -1.0, 2.4];
/// let tokens: Vec<u32> = (0..5).map(|_| sampler.sample(&mut row.clone())).collect();
/// assert!(tokens.iter().all(|&t| t < 4));
///
/// // The same seed gives the same tokens.
/// let mut again = Sampler::new(sampler.params().clone());
/// let same: Vec<u32> = (0..5).map(|_| again.sample(&mut row.clone())).collect();
/// assert_eq!(tokens, same);
/// ```
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    counts: HashMap<u32, u32>,
}

impl Sampler {
    /// A sampler for one generation.
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::generate::{Sampler, SamplingParams};
    ///
    /// // Greedy decoding: always the largest logit.
    /// let mut greedy = Sampler::new(SamplingParams::default());
    /// assert_eq!(greedy.sample(&mut [0.5, 3.0, 1.0]), 1);
    /// ```
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => Rng::seeded(seed),
            None => Rng::from_entropy(),
        };
        Sampler {
            params,
            rng,
            counts: HashMap::new(),
        }
    }

    /// The parameters it samples with.
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::generate::{Sampler, SamplingParams};
    ///
    /// let sampler = Sampler::new(SamplingParams { top_k: 50, ..SamplingParams::default() });
    /// assert_eq!(sampler.params().top_k, 50);
    /// ```
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// How many times `token` was sampled so far.
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::generate::{Sampler, SamplingParams};
    ///
    /// let mut sampler = Sampler::new(SamplingParams::default());
    /// sampler.sample(&mut [0.0, 1.0]);
    /// sampler.sample(&mut [0.0, 1.0]);
    /// assert_eq!(sampler.count(1), 2);
    /// assert_eq!(sampler.count(0), 0);
    /// ```
    pub fn count(&self, token: u32) -> u32 {
        self.counts.get(&token).copied().unwrap_or(0)
    }

    /// Picks the next token from one row of logits (one value per vocabulary id; modified in
    /// place by the penalties) and counts it as generated. NaN logits are never picked unless
    /// every logit is NaN.
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::generate::{Sampler, SamplingParams};
    ///
    /// // Greedy with a presence penalty of 1.5: token 0 wins first; then its logit is lowered
    /// // to 2.0 - 1.5 = 0.5 and token 1 wins.
    /// let mut sampler = Sampler::new(SamplingParams {
    ///     presence_penalty: 1.5,
    ///     ..SamplingParams::default()
    /// });
    /// assert_eq!(sampler.sample(&mut [2.0, 1.0, 0.0]), 0);
    /// assert_eq!(sampler.sample(&mut [2.0, 1.0, 0.0]), 1);
    /// ```
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        apply_penalties(
            logits,
            &self.counts,
            self.params.frequency_penalty,
            self.params.presence_penalty,
        );
        let token = if self.params.temperature <= 0.0 {
            argmax(logits)
        } else {
            let candidates = candidates(logits, self.params.temperature, self.params.top_k);
            let kept = top_p(&candidates, self.params.top_p);
            draw(&candidates[..kept], self.rng.next_f64())
        };
        *self.counts.entry(token).or_insert(0) += 1;
        token
    }
}

/// OpenAI's penalties: `logit[j] -= count[j] * frequency + (count[j] > 0) * presence`, for the
/// tokens in `counts` (ids outside `logits` are ignored).
///
/// # Examples
///
/// ```
/// use std::collections::HashMap;
/// use kiln_sdk::generate::apply_penalties;
///
/// let mut logits = [1.0, 2.0, 3.0, 0.5];
/// // Token 1 generated twice, token 2 once, token 3 three times.
/// let counts = HashMap::from([(1, 2), (2, 1), (3, 3)]);
/// apply_penalties(&mut logits, &counts, 0.5, 0.25);
/// assert_eq!(logits, [1.0, 0.75, 2.25, -1.25]);
/// ```
pub fn apply_penalties(
    logits: &mut [f32],
    counts: &HashMap<u32, u32>,
    frequency: f32,
    presence: f32,
) {
    if frequency == 0.0 && presence == 0.0 {
        return;
    }
    for (&token, &count) in counts {
        if let Some(logit) = logits.get_mut(token as usize) {
            if count > 0 {
                *logit -= count as f32 * frequency + presence;
            }
        }
    }
}

/// The id of the largest logit, the lowest such id on ties; NaNs are ignored (0 if every logit
/// is NaN or `logits` is empty).
///
/// # Examples
///
/// ```
/// use kiln_sdk::generate::argmax;
///
/// assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
/// assert_eq!(argmax(&[f32::NAN, -5.0]), 1);
/// assert_eq!(argmax(&[]), 0);
/// ```
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in logits.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map_or(0, |(i, _)| i as u32)
}

/// The tokens still in the running after temperature and top-k, with their probabilities
/// (softmax of `logit / temperature` over the kept tokens), most likely first, ties by lowest id.
///
/// `temperature` must be positive; `top_k == 0` keeps every token. NaN logits are dropped.
///
/// # Examples
///
/// ```
/// use kiln_sdk::generate::candidates;
///
/// // Temperature 1, the 2 best tokens: softmax([2, 1]) = [0.731, 0.269].
/// let c = candidates(&[1.0, 2.0, -1.0, 0.5], 1.0, 2);
/// assert_eq!((c[0].0, c[1].0), (1, 0));
/// assert!((c[0].1 - 0.731_058_6).abs() < 1e-6);
/// assert!((c[1].1 - 0.268_941_4).abs() < 1e-6);
/// ```
pub fn candidates(logits: &[f32], temperature: f32, top_k: u32) -> Vec<(u32, f32)> {
    let mut scored: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.is_nan())
        .map(|(i, &v)| (i as u32, v / temperature))
        .collect();
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let k = top_k as usize;
    if k > 0 && k < scored.len() {
        // Partition first: sorting all ~50k logits every step would dominate the step's cost.
        scored.select_nth_unstable_by(k - 1, order);
        scored.truncate(k);
    }
    scored.sort_unstable_by(order);
    softmax_in_place(&mut scored);
    scored
}

/// Replaces the scores (sorted, largest first) by their softmax, computed in f64.
fn softmax_in_place(scored: &mut [(u32, f32)]) {
    let Some(&(_, max)) = scored.first() else {
        return;
    };
    let max = f64::from(max);
    let exps: Vec<f64> = scored
        .iter()
        .map(|&(_, v)| (f64::from(v) - max).exp())
        .collect();
    let sum: f64 = exps.iter().sum();
    for ((_, v), e) in scored.iter_mut().zip(exps) {
        *v = (e / sum) as f32;
    }
}

/// How many of `candidates` (sorted, most likely first) nucleus sampling keeps: the smallest
/// prefix whose probabilities add up to at least `p`, at least one. `p >= 1` keeps them all.
///
/// # Examples
///
/// ```
/// use kiln_sdk::generate::top_p;
///
/// let c = [(5, 0.6), (2, 0.25), (9, 0.1), (0, 0.05)];
/// assert_eq!(top_p(&c, 0.5), 1); // 0.6 >= 0.5
/// assert_eq!(top_p(&c, 0.8), 2); // 0.6 + 0.25 >= 0.8
/// assert_eq!(top_p(&c, 1.0), 4);
/// assert_eq!(top_p(&c, 0.0), 1); // at least one
/// ```
pub fn top_p(candidates: &[(u32, f32)], p: f32) -> usize {
    if p >= 1.0 {
        return candidates.len();
    }
    let p = f64::from(p);
    let mut cumulative = 0.0f64;
    for (i, &(_, prob)) in candidates.iter().enumerate() {
        cumulative += f64::from(prob);
        if cumulative >= p {
            return i + 1;
        }
    }
    candidates.len()
}

/// Draws from `candidates` (their probabilities need not add up to 1: they are renormalised)
/// with `u` uniform in `[0, 1)`; 0 if there is no candidate.
///
/// # Examples
///
/// ```
/// use kiln_sdk::generate::{candidates, draw, top_p, Rng};
///
/// let c = [(7, 0.5), (3, 0.25), (9, 0.25)];
/// assert_eq!(draw(&c, 0.49), 7);
/// assert_eq!(draw(&c, 0.5), 3);
/// assert_eq!(draw(&c, 0.999), 9);
///
/// // What a sampling step does: temperature and top-k, top-p, then a draw.
/// let mut rng = Rng::seeded(42);
/// let c = candidates(&[0.1, 2.5, -1.0, 2.4], 0.7, 3);
/// let token = draw(&c[..top_p(&c, 0.9)], rng.next_f64());
/// assert!(token == 1 || token == 3);
/// ```
pub fn draw(candidates: &[(u32, f32)], u: f64) -> u32 {
    let total: f64 = candidates.iter().map(|&(_, p)| f64::from(p)).sum();
    let target = u * total;
    let mut cumulative = 0.0f64;
    for &(token, prob) in candidates {
        cumulative += f64::from(prob);
        if target < cumulative {
            return token;
        }
    }
    // Rounding left `target` at the very top: the last candidate with any probability.
    candidates
        .iter()
        .rev()
        .find(|&&(_, p)| p > 0.0)
        .or(candidates.first())
        .map_or(0, |&(token, _)| token)
}

/// Holds generated text back while it could still be the start of a stop sequence, and cuts the
/// text at the first stop sequence.
///
/// Feed it text with [`push`](StopMatcher::push); emit what it returns. Once it reports a stop,
/// the generation is over (the stop sequence and anything after it are never emitted). At the
/// end of a generation that did not stop, [`finish`](StopMatcher::finish) returns the text still
/// held back.
///
/// # Examples
///
/// ```
/// use kiln_sdk::generate::StopMatcher;
///
/// let mut stop = StopMatcher::new(["</s>", "\n\n"]);
/// let mut text = String::new();
/// for piece in ["Paris is", " the capital <", "/s> and more"] {
///     let (emit, stopped) = stop.push(piece);
///     text.push_str(&emit);
///     if stopped {
///         break;
///     }
/// }
/// assert_eq!(text, "Paris is the capital ");
/// assert!(stop.stopped());
/// ```
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for these stop sequences (empty ones are ignored).
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::generate::StopMatcher;
    ///
    /// // From a request's stop sequences.
    /// let requested: Vec<String> = vec!["\nUser:".into(), String::new()];
    /// let mut stop = StopMatcher::new(requested);
    /// assert_eq!(stop.push("Hi!\nUser: x"), ("Hi!".to_owned(), true));
    /// ```
    pub fn new<I, S>(stops: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        StopMatcher {
            stops: stops
                .into_iter()
                .map(Into::into)
                .filter(|s: &String| !s.is_empty())
                .collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Adds generated text; returns the text that can be emitted now and whether a stop sequence
    /// matched (then the returned text is everything before it, and later pushes return
    /// nothing).
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::generate::StopMatcher;
    ///
    /// let mut stop = StopMatcher::new(["END"]);
    /// // "E" could start "END": held back.
    /// assert_eq!(stop.push("the E"), ("the ".to_owned(), false));
    /// // "EX" cannot: released.
    /// assert_eq!(stop.push("X"), ("EX".to_owned(), false));
    /// assert_eq!(stop.push(" fin END tail"), (" fin ".to_owned(), true));
    /// assert_eq!(stop.push("more"), (String::new(), true));
    /// ```
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.held.push_str(text);
        // The earliest match wins, whichever stop sequence it is.
        let first_stop = self
            .stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()))
            .min();
        if let Some(at) = first_stop {
            self.held.truncate(at);
            self.stopped = true;
            return (std::mem::take(&mut self.held), true);
        }
        let keep = self.held.len() - self.partial_stop_start();
        let emit = self.held[..self.held.len() - keep].to_owned();
        self.held.drain(..emit.len());
        (emit, false)
    }

    /// The start of the longest suffix of the held text that is a proper prefix of a stop
    /// sequence (the held text's length if none).
    fn partial_stop_start(&self) -> usize {
        self.held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let suffix = &self.held[i..];
                self.stops
                    .iter()
                    .any(|stop| stop.len() > suffix.len() && stop.starts_with(suffix))
            })
            .unwrap_or(self.held.len())
    }

    /// The text still held back (call at the end of a generation that did not stop).
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::generate::StopMatcher;
    ///
    /// let mut stop = StopMatcher::new(["END"]);
    /// assert_eq!(stop.push("the EN"), ("the ".to_owned(), false));
    /// // The generation reached max_tokens: the held text is part of the output.
    /// assert_eq!(stop.finish(), "EN");
    /// ```
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Whether a stop sequence matched.
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::generate::StopMatcher;
    ///
    /// let mut stop = StopMatcher::new(["."]);
    /// stop.push("Hello");
    /// assert!(!stop.stopped());
    /// stop.push(". Bye");
    /// assert!(stop.stopped());
    /// ```
    pub fn stopped(&self) -> bool {
        self.stopped
    }
}

/// Turns a stream of bytes (such as the bytes of byte-level BPE tokens, which may split a
/// character between two tokens) into text, emitting only complete UTF-8 characters.
///
/// Invalid bytes become U+FFFD (as `String::from_utf8_lossy` does).
///
/// # Examples
///
/// ```
/// use kiln_sdk::generate::Utf8Decoder;
///
/// // "€" is e2 82 ac, split between two tokens' bytes.
/// let mut decoder = Utf8Decoder::new();
/// assert_eq!(decoder.push(b"1 \xe2\x82"), "1 ");
/// assert_eq!(decoder.push(b"\xac!"), "€!");
/// assert_eq!(decoder.finish(), "");
/// ```
#[derive(Debug, Clone, Default)]
pub struct Utf8Decoder {
    pending: Vec<u8>,
}

impl Utf8Decoder {
    /// An empty decoder.
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::generate::Utf8Decoder;
    ///
    /// let mut decoder = Utf8Decoder::new();
    /// assert_eq!(decoder.push(b"ok"), "ok");
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes; returns the complete characters now available (possibly "").
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::generate::Utf8Decoder;
    ///
    /// let mut decoder = Utf8Decoder::new();
    /// let e_acute = "é".as_bytes(); // c3 a9
    /// assert_eq!(decoder.push(&e_acute[..1]), "");
    /// assert_eq!(decoder.push(&e_acute[1..]), "é");
    /// // An invalid byte becomes U+FFFD.
    /// assert_eq!(decoder.push(&[0xFF, b'x']), "\u{FFFD}x");
    /// ```
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    out.push_str(valid);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // `valid_up_to` bytes were just checked to be UTF-8: this cannot fail.
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                        // An incomplete character at the end: wait for its other bytes.
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        let consumed = self.pending.len() - rest.len();
        self.pending.drain(..consumed);
        out
    }

    /// The bytes still held back, decoded lossily (call at the end of a generation).
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::generate::Utf8Decoder;
    ///
    /// let mut decoder = Utf8Decoder::new();
    /// // The generation ended in the middle of "€" (e2 82 ac).
    /// assert_eq!(decoder.push(b"a\xe2\x82"), "a");
    /// assert_eq!(decoder.finish(), "\u{FFFD}");
    /// ```
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }
}

/// GPT-2's byte-level BPE alphabet: the character that stands for each byte in the vocabulary's
/// token strings (printable Latin-1 bytes stand for themselves, the others are shifted to
/// U+0100 and up).
fn byte_level_char(byte: u8) -> char {
    match byte {
        b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF => char::from(byte),
        _ => {
            // The n-th byte (in order) outside the printable ranges maps to U+0100 + n.
            let n = (0..byte)
                .filter(|b| !matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF))
                .count() as u32;
            char::from_u32(0x100 + n).unwrap_or(char::REPLACEMENT_CHARACTER)
        }
    }
}

/// A reusable table from byte-level BPE characters back to bytes (see [`byte_level_bytes`]).
///
/// # Examples
///
/// ```
/// use kiln_sdk::generate::{ByteLevelTable, Utf8Decoder};
///
/// // Once, in `init`: the vocabulary's token strings as bytes.
/// let table = ByteLevelTable::new();
/// let vocab = ["Hello", "Ġw", "orld", "Ċ"];
/// let token_bytes: Vec<Vec<u8>> = vocab.iter().map(|t| table.bytes(t)).collect();
///
/// // Per generated token.
/// let mut decoder = Utf8Decoder::new();
/// let text: String = [0, 1, 2, 3].iter().map(|&id| decoder.push(&token_bytes[id])).collect();
/// assert_eq!(text, "Hello world\n");
/// ```
#[derive(Debug, Clone)]
pub struct ByteLevelTable {
    chars: HashMap<char, u8>,
}

impl Default for ByteLevelTable {
    fn default() -> Self {
        ByteLevelTable {
            chars: (0..=255u8).map(|b| (byte_level_char(b), b)).collect(),
        }
    }
}

impl ByteLevelTable {
    /// The table of GPT-2's byte-level alphabet.
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::generate::ByteLevelTable;
    ///
    /// let table = ByteLevelTable::new();
    /// assert_eq!(table.bytes("Ġthe"), b" the");
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// The bytes a byte-level BPE token string stands for (characters outside the alphabet are
    /// kept as their own UTF-8 bytes).
    ///
    /// # Examples
    ///
    /// ```
    /// use kiln_sdk::generate::ByteLevelTable;
    ///
    /// let table = ByteLevelTable::new();
    /// assert_eq!(table.bytes("ĊĊ"), b"\n\n");
    /// // "é" is c3 a9: the characters 'Ã' (0xC3) and '©' (0xA9).
    /// assert_eq!(table.bytes("Ã©"), "é".as_bytes());
    /// ```
    pub fn bytes(&self, token: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(token.len());
        for c in token.chars() {
            match self.chars.get(&c) {
                Some(&b) => out.push(b),
                None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
        out
    }
}

/// The bytes a byte-level BPE token string (such as `"Ġcapital"` in a GPT-2, Llama 3 or SmolLM
/// vocabulary) stands for: `"Ġcapital"` is `b" capital"`. For many tokens, build a
/// [`ByteLevelTable`] once.
///
/// # Examples
///
/// ```
/// use kiln_sdk::generate::byte_level_bytes;
///
/// assert_eq!(byte_level_bytes("Ġcapital"), b" capital");
/// ```
pub fn byte_level_bytes(token: &str) -> Vec<u8> {
    ByteLevelTable::new().bytes(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream() {
        let mut a = Rng::seeded(42);
        let mut b = Rng::seeded(42);
        let mut c = Rng::seeded(43);
        let xs: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        let zs: Vec<u64> = (0..8).map(|_| c.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
        for _ in 0..1000 {
            let u = a.next_f64();
            assert!((0.0..1.0).contains(&u));
        }
    }

    #[test]
    fn splitmix_and_xoshiro_match_the_reference_outputs() {
        // SplitMix64 from seed 0 (Vigna's splitmix64.c): first output 0xE220A8397B1DCDAF.
        let mut s = 0u64;
        assert_eq!(splitmix64(&mut s), 0xE220_A839_7B1D_CDAF);
        // xoshiro256** with state [1, 2, 3, 4] (xoshiro256starstar.c): first outputs 11520, 0,
        // 1509978240, 1215971899390074240.
        let mut rng = Rng {
            state: [1, 2, 3, 4],
        };
        let out: Vec<u64> = (0..4).map(|_| rng.next_u64()).collect();
        assert_eq!(out, vec![11520, 0, 1509978240, 1215971899390074240]);
    }

    #[test]
    fn entropy_seeds_differ() {
        let a = Rng::from_entropy().next_u64();
        let b = Rng::from_entropy().next_u64();
        assert_ne!(a, b);
    }

    #[test]
    fn penalties_match_numpy() {
        // logits = np.array([1.0, 2.0, 3.0, 0.5]); counts = np.array([0, 2, 1, 3])
        // logits - counts * 0.5 - (counts > 0) * 0.25 -> [1.0, 0.75, 2.25, -1.25]
        let mut logits = [1.0f32, 2.0, 3.0, 0.5];
        let counts = HashMap::from([(1, 2), (2, 1), (3, 3), (99, 4)]);
        apply_penalties(&mut logits, &counts, 0.5, 0.25);
        assert_eq!(logits, [1.0, 0.75, 2.25, -1.25]);

        // Negative penalties encourage repetition: counts as above, frequency -0.5, presence 0
        // -> logits - counts * -0.5 = [1.0, 3.0, 3.5, 2.0]
        let mut logits = [1.0f32, 2.0, 3.0, 0.5];
        apply_penalties(&mut logits, &counts, -0.5, 0.0);
        assert_eq!(logits, [1.0, 3.0, 3.5, 2.0]);
    }

    #[test]
    fn greedy_is_argmax_with_ties_to_the_lowest_id() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -5.0, f32::NAN]), 1);
        assert_eq!(argmax(&[]), 0);
        let mut sampler = Sampler::new(SamplingParams::default());
        assert_eq!(sampler.sample(&mut [0.0, 2.0, 2.0, 1.0]), 1);
    }

    #[test]
    fn penalties_apply_before_greedy_and_count_generated_tokens() {
        let mut sampler = Sampler::new(SamplingParams {
            presence_penalty: 1.5,
            ..SamplingParams::default()
        });
        // Token 0 wins first; then its 1.5 presence penalty (2.0 - 1.5 = 0.5) lets token 1 win.
        assert_eq!(sampler.sample(&mut [2.0, 1.0, 0.0]), 0);
        assert_eq!(sampler.sample(&mut [2.0, 1.0, 0.0]), 1);
        assert_eq!(sampler.count(0), 1);
        assert_eq!(sampler.count(1), 1);
        // Both now penalised by 1.5: 0.5, -0.5, 0.0 -> token 0.
        assert_eq!(sampler.sample(&mut [2.0, 1.0, 0.0]), 0);
    }

    #[test]
    fn softmax_with_temperature_matches_numpy() {
        // x = np.array([2.0, 1.0, 0.5, -1.0]) / 0.5; p = np.exp(x - x.max()); p /= p.sum()
        // -> [0.84203357, 0.11395685, 0.04192238, 0.00208719] (sorted, largest first)
        let c = candidates(&[1.0, 2.0, -1.0, 0.5], 0.5, 0);
        let ids: Vec<u32> = c.iter().map(|&(i, _)| i).collect();
        assert_eq!(ids, vec![1, 0, 3, 2]);
        let expected = [0.842_033_57, 0.113_956_85, 0.041_922_38, 0.002_087_19];
        for ((_, p), e) in c.iter().zip(expected) {
            assert!((p - e).abs() < 1e-6, "{p} vs {e}");
        }
    }

    #[test]
    fn top_k_keeps_the_k_best_and_renormalises() {
        // x = np.array([2.0, 1.0]); p = np.exp(x) / np.exp(x).sum() -> [0.73105858, 0.26894142]
        let c = candidates(&[1.0, 2.0, -1.0, 0.5], 1.0, 2);
        assert_eq!(c.len(), 2);
        assert_eq!((c[0].0, c[1].0), (1, 0));
        assert!((c[0].1 - 0.731_058_6).abs() < 1e-6);
        assert!((c[1].1 - 0.268_941_4).abs() < 1e-6);
        // Ties at the cut go to the lowest id.
        let c = candidates(&[1.0, 1.0, 1.0, 0.0], 1.0, 2);
        assert_eq!((c[0].0, c[1].0), (0, 1));
    }

    #[test]
    fn top_p_matches_numpy() {
        // x = np.array([3.0, 2.0, 1.0, 0.0]); p = np.exp(x) / np.exp(x).sum()
        // -> [0.64391426, 0.23688282, 0.08714432, 0.0320586]
        // np.cumsum(p) -> [0.64391426, 0.88079708, 0.9679414, 1.0]
        let c = candidates(&[3.0, 2.0, 1.0, 0.0], 1.0, 0);
        let cumsum = [0.643_914_3, 0.880_797_1, 0.967_941_4, 1.0];
        let mut acc = 0.0;
        for ((_, p), e) in c.iter().zip(cumsum) {
            acc += p;
            assert!((acc - e).abs() < 1e-6);
        }
        // Smallest prefix with cumulative >= p: np.searchsorted(np.cumsum(p), q) + 1
        assert_eq!(top_p(&c, 0.5), 1);
        assert_eq!(top_p(&c, 0.643), 1);
        assert_eq!(top_p(&c, 0.65), 2);
        assert_eq!(top_p(&c, 0.9), 3);
        assert_eq!(top_p(&c, 0.97), 4);
        assert_eq!(top_p(&c, 1.0), 4);
        // Always at least one.
        assert_eq!(top_p(&c, 0.0), 1);
    }

    #[test]
    fn draw_follows_the_cumulative_distribution() {
        let c = [(7, 0.5), (3, 0.25), (9, 0.25)];
        assert_eq!(draw(&c, 0.0), 7);
        assert_eq!(draw(&c, 0.49), 7);
        assert_eq!(draw(&c, 0.5), 3);
        assert_eq!(draw(&c, 0.74), 3);
        assert_eq!(draw(&c, 0.999), 9);
        // Renormalised: only the first two kept by top-p.
        assert_eq!(draw(&c[..2], 0.7), 3);
        assert_eq!(draw(&[], 0.3), 0);
    }

    #[test]
    fn sampling_frequencies_follow_the_probabilities() {
        let mut sampler = Sampler::new(SamplingParams {
            temperature: 1.0,
            seed: Some(7),
            ..SamplingParams::default()
        });
        // p = softmax([ln 3, ln 1]) = [0.75, 0.25]
        let logits = [3.0f32.ln(), 0.0];
        let n = 20_000;
        let zeros = (0..n)
            .filter(|_| sampler.sample(&mut logits.clone()) == 0)
            .count();
        let share = zeros as f64 / f64::from(n);
        assert!((share - 0.75).abs() < 0.02, "{share}");
    }

    #[test]
    fn seeded_samplers_agree_and_top_k_1_is_greedy() {
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            top_k: 50,
            seed: Some(42),
            ..SamplingParams::default()
        };
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 / 10.0).collect();
        let mut a = Sampler::new(params.clone());
        let mut b = Sampler::new(params.clone());
        let xs: Vec<u32> = (0..50).map(|_| a.sample(&mut logits.clone())).collect();
        let ys: Vec<u32> = (0..50).map(|_| b.sample(&mut logits.clone())).collect();
        assert_eq!(xs, ys);
        let mut k1 = Sampler::new(SamplingParams { top_k: 1, ..params });
        assert_eq!(k1.sample(&mut logits.clone()), argmax(&logits));
    }

    #[test]
    fn stop_matcher_holds_back_possible_starts() {
        let mut m = StopMatcher::new(["</s>", "\n\n"]);
        assert_eq!(m.push("Hello <"), ("Hello ".to_owned(), false));
        assert_eq!(m.push("/"), (String::new(), false));
        // "</x" can no longer become "</s>": released.
        assert_eq!(m.push("x"), ("</x".to_owned(), false));
        assert_eq!(m.push(" end\n"), (" end".to_owned(), false));
        assert_eq!(m.push("\nmore"), (String::new(), true));
        assert!(m.stopped());
        assert_eq!(m.push("later"), (String::new(), true));
    }

    #[test]
    fn stop_matcher_cuts_at_the_earliest_stop_inside_one_piece() {
        let mut m = StopMatcher::new(["world", "lo"]);
        assert_eq!(m.push("hello world"), ("hel".to_owned(), true));
        let mut m = StopMatcher::new(["\n"]);
        assert_eq!(m.push("a\nb\n"), ("a".to_owned(), true));
    }

    #[test]
    fn stop_matcher_finish_releases_held_text() {
        let mut m = StopMatcher::new(["END"]);
        assert_eq!(m.push("the EN"), ("the ".to_owned(), false));
        assert_eq!(m.finish(), "EN");
        let mut none = StopMatcher::new(Vec::<String>::new());
        assert_eq!(none.push("anything"), ("anything".to_owned(), false));
        let mut empty = StopMatcher::new([""]);
        assert_eq!(empty.push("x"), ("x".to_owned(), false));
    }

    #[test]
    fn stop_matcher_respects_char_boundaries() {
        let mut m = StopMatcher::new(["é!"]);
        assert_eq!(m.push("café"), ("caf".to_owned(), false));
        assert_eq!(m.push("?"), ("é?".to_owned(), false));
        assert_eq!(m.push("é!"), (String::new(), true));
    }

    #[test]
    fn utf8_decoder_waits_for_whole_characters() {
        let mut d = Utf8Decoder::new();
        let euro = "€".as_bytes(); // e2 82 ac
        assert_eq!(d.push(b"a"), "a");
        assert_eq!(d.push(&euro[..1]), "");
        assert_eq!(d.push(&euro[1..2]), "");
        assert_eq!(d.push(&[euro[2], b'b']), "€b");
        // An invalid byte becomes U+FFFD, the rest goes on.
        assert_eq!(d.push(&[0xFF, b'c']), "\u{FFFD}c");
        // An incomplete character left at the end is flushed lossily.
        assert_eq!(d.push(&euro[..2]), "");
        assert_eq!(d.finish(), "\u{FFFD}");
        assert_eq!(d.finish(), "");
    }

    #[test]
    fn byte_level_mapping_matches_gpt2() {
        // GPT-2's bytes_to_unicode: space -> 'Ġ' (U+0120), '\n' -> 'Ċ' (U+010A), 0x00 -> U+0100,
        // 0xAD -> 'Ń' (U+0143: after the 33 + 34 unprintable bytes below it), 'a' -> 'a'.
        assert_eq!(byte_level_char(b' '), 'Ġ');
        assert_eq!(byte_level_char(b'\n'), 'Ċ');
        assert_eq!(byte_level_char(0), '\u{100}');
        assert_eq!(byte_level_char(0xAD), 'Ń');
        assert_eq!(byte_level_char(b'a'), 'a');
        assert_eq!(byte_level_bytes("Ġcapital"), b" capital");
        assert_eq!(byte_level_bytes("ĊĊ"), b"\n\n");
        // "é" is c3 a9: 'Ã' (0xC3) and '©' (0xA9).
        assert_eq!(byte_level_bytes("Ã©"), "é".as_bytes());
        let table = ByteLevelTable::new();
        assert_eq!(table.chars.len(), 256);
    }
}
