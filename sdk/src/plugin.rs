//! What a plugin implements: [`Plugin`] (its `init`, which builds the plugin's state once per
//! instance) and its task's trait ([`EmbeddingsPlugin`], [`TextClassificationPlugin`],
//! [`ImageClassificationPlugin`], [`ObjectDetectionPlugin`], [`AsrPlugin`],
//! [`TextGenerationPlugin`]), whose methods take that state as `&self`.
//!
//! The WIT exports are plain functions with no `self`, so the state `init` builds has to live in
//! a `static` until the requests that use it. The export macros ([`export_embeddings!`] and the
//! others) own that `static`: they keep the value `init` returned in the plugin crate's one
//! `OnceLock` and forward each WIT export to it, answering "`<export>` called before init" (an
//! [`Error::Internal`]) if the host ever calls an export before `init` succeeded.
//!
//! [`export_embeddings!`]: crate::export_embeddings

use std::marker::PhantomData;
use std::sync::OnceLock;

use crate::asr::Transcript;
use crate::object_detection::Detection;
use crate::text_generation::{GuestGeneration, Input, Params};
use crate::{embeddings, text_classification, Audio, ClassScore, Error, Image};

/// Every plugin: `init` runs once per instance, before its first request, and returns the
/// plugin's state (tokenizer, labels, graphs, configuration); its error fails the instance's
/// start. The task's methods then get that value as `&self`.
///
/// The value lives in a `static` of the plugin crate, hence `Send + Sync + 'static`; an instance
/// runs one request at a time, so per-request mutable state belongs in the request, not here.
///
/// # Examples
///
/// ```
/// use kiln_sdk::embeddings::Output;
/// use kiln_sdk::{config_or, EmbeddingsPlugin, Error, Plugin, Usage};
///
/// struct Constant {
///     value: f32,
/// }
///
/// impl Plugin for Constant {
///     fn init() -> Result<Self, Error> {
///         // `[plugin.config] value = ...`, 1.0 when absent.
///         Ok(Constant { value: config_or("value", 1.0)? })
///     }
/// }
///
/// impl EmbeddingsPlugin for Constant {
///     fn embed(&self, inputs: Vec<String>) -> Result<Output, Error> {
///         let vectors = inputs.iter().map(|_| vec![self.value]).collect();
///         Ok(Output { vectors, usage: Usage { input_tokens: 0, output_tokens: 0 } })
///     }
/// }
///
/// kiln_sdk::export_embeddings!(Constant);
///
/// let out = Constant { value: 0.5 }.embed(vec!["a".into(), "b".into()])?;
/// assert_eq!(out.vectors, [[0.5], [0.5]]);
/// # Ok::<(), Error>(())
/// ```
pub trait Plugin: Sized + Send + Sync + 'static {
    /// Builds the plugin's state: read the configuration, load the tokenizer, labels and graphs.
    fn init() -> Result<Self, Error>;
}

/// The embeddings task (`kiln:plugin/embeddings`); export with
/// [`export_embeddings!`](crate::export_embeddings), which has a complete example.
pub trait EmbeddingsPlugin: Plugin {
    /// One vector per input, in order.
    fn embed(&self, inputs: Vec<String>) -> Result<embeddings::Output, Error>;
}

/// The text classification task (`kiln:plugin/text-classification`); export with
/// [`export_text_classification!`](crate::export_text_classification), which has a complete
/// example.
pub trait TextClassificationPlugin: Plugin {
    /// One ranked list of labels per input, in order, best first.
    fn classify(&self, inputs: Vec<String>) -> Result<text_classification::Output, Error>;
}

/// The image classification task (`kiln:plugin/image-classification`); export with
/// [`export_image_classification!`](crate::export_image_classification), which has a complete
/// example.
pub trait ImageClassificationPlugin: Plugin {
    /// The `top_k` best labels of the image, best first.
    fn classify(&self, image: Image, top_k: u32) -> Result<Vec<ClassScore>, Error>;
}

/// The object detection task (`kiln:plugin/object-detection`); export with
/// [`export_object_detection!`](crate::export_object_detection), which has a complete example.
pub trait ObjectDetectionPlugin: Plugin {
    /// The objects scoring at least `threshold`, best first, in the image's pixels.
    fn detect(&self, image: Image, threshold: f32) -> Result<Vec<Detection>, Error>;
}

/// The speech recognition task (`kiln:plugin/asr`); export with
/// [`export_asr!`](crate::export_asr), which has a complete example.
pub trait AsrPlugin: Plugin {
    /// The transcript of the audio file.
    fn transcribe(&self, audio: Audio) -> Result<Transcript, Error>;
}

/// The text generation task (`kiln:plugin/text-generation`); export with
/// [`export_text_generation!`](crate::export_text_generation), which has a complete example.
///
/// `start` gets the state for the whole life of the instance (`&'static self`), so a generation
/// may keep a reference to it between its `next` calls.
pub trait TextGenerationPlugin: Plugin {
    /// A generation in progress: the WIT `generation` resource.
    type Generation: GuestGeneration;

    /// Checks the input and parameters and starts a generation (no token is produced yet:
    /// `next` produces them).
    fn start(&'static self, input: Input, params: Params) -> Result<Self::Generation, Error>;
}

/// The `static` holding a plugin's state; implemented by the export macros, once per plugin
/// crate.
#[doc(hidden)]
pub trait Exported: Plugin {
    /// The plugin crate's one cell for the value `init` returned.
    fn cell() -> &'static OnceLock<Self>;
}

/// The type the export macros hand to wit-bindgen: its WIT exports forward to `P`'s state.
#[doc(hidden)]
pub struct Exports<P>(PhantomData<P>);

/// The state `init` made, or the error an export called before `init` gets.
fn state<P: Exported>(export: &str) -> Result<&'static P, Error> {
    P::cell()
        .get()
        .ok_or_else(|| Error::internal(format!("{export} called before init")))
}

impl<P: Exported> crate::__lifecycle::exports::kiln::plugin::lifecycle::Guest for Exports<P> {
    fn init() -> Result<(), Error> {
        let plugin = P::init()?;
        // A second `init` (the host calls it once per instance) keeps the first state.
        let _ = P::cell().set(plugin);
        Ok(())
    }
}

impl<P: Exported + EmbeddingsPlugin> embeddings::Guest for Exports<P> {
    fn embed(inputs: Vec<String>) -> Result<embeddings::Output, Error> {
        state::<P>("embed")?.embed(inputs)
    }
}

impl<P: Exported + TextClassificationPlugin> text_classification::Guest for Exports<P> {
    fn classify(inputs: Vec<String>) -> Result<text_classification::Output, Error> {
        state::<P>("classify")?.classify(inputs)
    }
}

impl<P: Exported + ImageClassificationPlugin> crate::image_classification::Guest for Exports<P> {
    fn classify(image: Image, top_k: u32) -> Result<Vec<ClassScore>, Error> {
        state::<P>("classify")?.classify(image, top_k)
    }
}

impl<P: Exported + ObjectDetectionPlugin> crate::object_detection::Guest for Exports<P> {
    fn detect(image: Image, threshold: f32) -> Result<Vec<Detection>, Error> {
        state::<P>("detect")?.detect(image, threshold)
    }
}

impl<P: Exported + AsrPlugin> crate::asr::Guest for Exports<P> {
    fn transcribe(audio: Audio) -> Result<Transcript, Error> {
        state::<P>("transcribe")?.transcribe(audio)
    }
}

impl<P: Exported + TextGenerationPlugin> crate::text_generation::Guest for Exports<P> {
    type Generation = P::Generation;

    fn start(input: Input, params: Params) -> Result<crate::text_generation::Generation, Error> {
        let generation = state::<P>("start")?.start(input, params)?;
        Ok(crate::text_generation::Generation::new(generation))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::__lifecycle::exports::kiln::plugin::lifecycle::Guest as Lifecycle;
    use crate::embeddings::Guest as _;
    use crate::Usage;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Counts its `init` calls; embeds each input as `[the init call that made this state]`.
    struct Counter {
        made_by_call: u32,
    }

    static INITS: AtomicU32 = AtomicU32::new(0);

    impl Plugin for Counter {
        fn init() -> Result<Self, Error> {
            let call = INITS.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(Counter { made_by_call: call })
        }
    }

    impl EmbeddingsPlugin for Counter {
        fn embed(&self, inputs: Vec<String>) -> Result<embeddings::Output, Error> {
            Ok(embeddings::Output {
                vectors: inputs
                    .iter()
                    .map(|_| vec![self.made_by_call as f32])
                    .collect(),
                usage: Usage {
                    input_tokens: 0,
                    output_tokens: 0,
                },
            })
        }
    }

    crate::export_embeddings!(Counter);

    #[test]
    fn exports_answer_an_error_before_init_then_use_the_first_state() {
        let before = Exports::<Counter>::embed(vec!["a".into()]).unwrap_err();
        assert!(
            matches!(&before, Error::Internal(m) if m == "embed called before init"),
            "{before:?}"
        );
        Exports::<Counter>::init().unwrap();
        Exports::<Counter>::init().unwrap();
        assert_eq!(INITS.load(Ordering::SeqCst), 2);
        let out = Exports::<Counter>::embed(vec!["a".into(), "b".into()]).unwrap();
        assert_eq!(
            out.vectors,
            [[1.0], [1.0]],
            "the first init's state is kept"
        );
    }

    /// Its `init` fails: the instance never gets a state.
    struct Broken;

    impl Plugin for Broken {
        fn init() -> Result<Self, Error> {
            Err(Error::internal("labels.txt is missing"))
        }
    }

    impl TextClassificationPlugin for Broken {
        fn classify(&self, _: Vec<String>) -> Result<text_classification::Output, Error> {
            unreachable!("no state: classify is never called")
        }
    }

    crate::export_text_classification!(Broken);

    #[test]
    fn a_failed_init_is_returned_and_leaves_no_state() {
        use crate::text_classification::Guest as _;
        let failed = Exports::<Broken>::init().unwrap_err();
        assert!(matches!(&failed, Error::Internal(m) if m == "labels.txt is missing"));
        let after = Exports::<Broken>::classify(Vec::new()).unwrap_err();
        assert!(
            matches!(&after, Error::Internal(m) if m == "classify called before init"),
            "{after:?}"
        );
    }
}
