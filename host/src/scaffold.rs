//! `kiln plugin new <task> <dir>`: writes a plugin crate for one task that builds as is and
//! serves the task's demo model.
//!
//! For embeddings, text classification, image classification and object detection the handler
//! is a short one written for the demo model (`host/templates/<task>/lib.rs`). A minimal Whisper
//! decoder or KV-cached generator is not short, so for asr and text-generation the crate gets the
//! first-party plugin's own source (`plugins/<task>/src/*.rs`, its unit tests left out), embedded
//! here at compile time so it never drifts from the plugin Kiln ships.
//!
//! The crate depends on `kiln-sdk` by path (this repository's `sdk/`, known at compile time, or
//! `--sdk-path`); other dependencies take their versions from this workspace's `Cargo.toml`, and
//! `Cargo.lock` starts as the repository's, so a new crate builds with the versions Kiln's own
//! plugins are tested with.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// The tasks `kiln plugin new` writes a crate for, as the API names them.
pub const TASKS: [&str; 6] = [
    "embeddings",
    "text-classification",
    "image-classification",
    "object-detection",
    "asr",
    "text-generation",
];

/// Where a crate's handler comes from.
enum Source {
    /// A minimal handler written for the demo model, and the kiln-sdk features it needs.
    Minimal {
        lib: &'static str,
        features: &'static [&'static str],
    },
    /// The first-party plugin: its manifest (for its dependencies) and its source files (name
    /// under `src/`, text).
    FirstParty {
        manifest: &'static str,
        files: &'static [(&'static str, &'static str)],
    },
}

/// What `kiln plugin new` writes for one task.
struct Template {
    task: &'static str,
    source: Source,
    /// The demo model's folder under `.kiln/models/demo/`.
    model: &'static str,
    /// `model.toml.example` (its `[plugin] path` is replaced by the crate's build).
    model_toml: &'static str,
    /// A shell snippet calling the model (`{{model_id}}` for its id), run in the repository.
    request: &'static str,
}

const CURL: &str = "curl -s http://127.0.0.1:8080/v1/inference";
const AUTH: &str = "\\\n  -H \"Authorization: Bearer $(cat .kiln/demo-token)\" \
                    -H 'Content-Type: application/json' -H 'X-Wait-For-Model: true'";

static TEMPLATES: [Template; 6] = [
    Template {
        task: "embeddings",
        source: Source::Minimal {
            lib: include_str!("../templates/embeddings/lib.rs"),
            features: &["text"],
        },
        model: "minilm",
        model_toml: include_str!("../templates/embeddings/model.toml"),
        request: "{{curl}}/embeddings {{auth}} \\\n  -d '{\"model\": \"{{model_id}}\", \
                  \"inputs\": [\"A man is eating food.\", \"A man is eating a piece of bread.\"]}'\n\
                  # the two vectors' cosine similarity is about 0.753",
    },
    Template {
        task: "text-classification",
        source: Source::Minimal {
            lib: include_str!("../templates/text-classification/lib.rs"),
            features: &["text"],
        },
        model: "sentiment",
        model_toml: include_str!("../templates/text-classification/model.toml"),
        request: "{{curl}}/text-classification {{auth}} \\\n  -d '{\"model\": \"{{model_id}}\", \
                  \"inputs\": \"I love this product! It is amazing.\"}'\n\
                  # positive first, about 0.97",
    },
    Template {
        task: "image-classification",
        source: Source::Minimal {
            lib: include_str!("../templates/image-classification/lib.rs"),
            features: &["image"],
        },
        model: "efficientnet-lite0",
        model_toml: include_str!("../templates/image-classification/model.toml"),
        request: "(printf '{\"model\": \"{{model_id}}\", \"top_k\": 3, \"image\": \
                  \"data:image/png;base64,'; \\\n  base64 -w0 ../shared/models/test-inputs/coffee.png; \
                  printf '\"}') > req.json\n\
                  {{curl}}/image-classification {{auth}} -d @req.json\n\
                  # espresso first, about 0.95",
    },
    Template {
        task: "object-detection",
        source: Source::Minimal {
            lib: include_str!("../templates/object-detection/lib.rs"),
            features: &["image"],
        },
        model: "nanodet",
        model_toml: include_str!("../templates/object-detection/model.toml"),
        request: "(printf '{\"model\": \"{{model_id}}\", \"image\": \"data:image/png;base64,'; \\\n  \
                  base64 -w0 ../shared/models/test-inputs/astronaut.png; printf '\"}') > req.json\n\
                  {{curl}}/object-detection {{auth}} -d @req.json\n\
                  # a person, about 0.73, box [14, 14, 364, 507]",
    },
    Template {
        task: "asr",
        source: Source::FirstParty {
            manifest: include_str!("../../plugins/asr/Cargo.toml"),
            files: &[("lib.rs", include_str!("../../plugins/asr/src/lib.rs"))],
        },
        model: "whisper-tiny-en",
        model_toml: include_str!("../../demo-models/whisper-tiny-en/model.toml"),
        request: "(printf '{\"model\": \"{{model_id}}\", \"audio\": \"data:audio/wav;base64,'; \\\n  \
                  base64 -w0 ../shared/models/test-inputs/beckett.wav; printf '\"}') > req.json\n\
                  {{curl}}/asr {{auth}} -d @req.json\n\
                  # \"Ever tried, ever failed. No matter, try again. Fail again. Fail better.\"",
    },
    Template {
        task: "text-generation",
        source: Source::FirstParty {
            manifest: include_str!("../../plugins/text-generation/Cargo.toml"),
            files: &[
                (
                    "lib.rs",
                    include_str!("../../plugins/text-generation/src/lib.rs"),
                ),
                (
                    "chat.rs",
                    include_str!("../../plugins/text-generation/src/chat.rs"),
                ),
                (
                    "stream.rs",
                    include_str!("../../plugins/text-generation/src/stream.rs"),
                ),
            ],
        },
        model: "smollm2-135m",
        model_toml: include_str!("../../demo-models/smollm2-135m/model.toml"),
        request: "{{curl}}/text-generation {{auth}} \\\n  -d '{\"model\": \"{{model_id}}\", \
                  \"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}], \
                  \"temperature\": 0}'\n\
                  # \"The capital of France is Paris.\"",
    },
];

/// This workspace's manifest: the versions and features of `[workspace.dependencies]`.
const WORKSPACE_MANIFEST: &str = include_str!("../../Cargo.toml");
const CARGO_TOML: &str = include_str!("../templates/Cargo.toml.in");
const README: &str = include_str!("../templates/README.md");
const GITIGNORE: &str = "/target\n";

/// The crate `kiln plugin new` wrote.
#[derive(Debug)]
pub struct Scaffold {
    /// The package name (from the folder's name).
    pub name: String,
    /// The folder, as given.
    pub dir: PathBuf,
    /// The files written, relative to `dir`.
    pub files: Vec<PathBuf>,
    /// The kiln-sdk crate it depends on.
    pub sdk: PathBuf,
}

/// Where this binary was built from: `<repository>/sdk`.
pub fn default_sdk_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk")
}

/// The kiln-sdk crate at `given` (else [`default_sdk_path`]), as an absolute path.
fn locate_sdk(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = given.map_or_else(default_sdk_path, Path::to_owned);
    let how = if given.is_some() {
        "--sdk-path"
    } else {
        "the kiln-sdk of the repository this kiln was built from"
    };
    let sdk = path.canonicalize().map_err(|e| {
        anyhow::anyhow!(
            "kiln-sdk not found at {} ({how}): {e}; pass --sdk-path <the kiln-sdk crate's folder>",
            path.display()
        )
    })?;
    let manifest = sdk.join("Cargo.toml");
    let name = std::fs::read_to_string(&manifest)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|t| t.get("package")?.get("name")?.as_str().map(str::to_owned));
    if name.as_deref() != Some("kiln-sdk") {
        bail!(
            "{} is not the kiln-sdk crate (no Cargo.toml naming package kiln-sdk): pass \
             --sdk-path <the kiln-sdk crate's folder>",
            sdk.display()
        );
    }
    Ok(sdk)
}

/// A valid package name made of a folder name: lower case, `[a-z0-9_-]`, starting with a letter,
/// not a name the compiler or Cargo reserves.
pub fn crate_name(dir_name: &str) -> String {
    let mut name = String::new();
    for c in dir_name.chars().flat_map(char::to_lowercase) {
        let c = if c.is_ascii_alphanumeric() || c == '_' {
            c
        } else {
            '-'
        };
        if c == '-' && (name.is_empty() || name.ends_with('-')) {
            continue;
        }
        name.push(c);
    }
    let name = name.trim_matches(|c| c == '-' || c == '_');
    const RESERVED: &[&str] = &[
        "std",
        "core",
        "alloc",
        "proc-macro",
        "proc_macro",
        "test",
        "build",
        "deps",
        "examples",
        "incremental",
        "kiln-sdk",
        "kiln_sdk",
        "self",
        "super",
        "crate",
    ];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        format!("plugin-{name}").trim_end_matches('-').to_owned()
    } else if RESERVED.contains(&name) || is_keyword(name) {
        format!("{name}-plugin")
    } else {
        name.to_owned()
    }
}

fn is_keyword(name: &str) -> bool {
    const KEYWORDS: &[&str] = &[
        "abstract", "as", "async", "await", "become", "box", "break", "const", "continue", "do",
        "dyn", "else", "enum", "extern", "false", "final", "fn", "for", "gen", "if", "impl", "in",
        "let", "loop", "macro", "match", "mod", "move", "mut", "override", "priv", "pub", "ref",
        "return", "static", "struct", "trait", "true", "try", "type", "typeof", "unsafe",
        "unsized", "use", "virtual", "where", "while", "yield",
    ];
    KEYWORDS.contains(&name)
}

/// `text` with each `{{key}}` replaced by its value.
fn render(text: &str, values: &[(&str, &str)]) -> String {
    values.iter().fold(text.to_owned(), |text, (key, value)| {
        text.replace(&format!("{{{{{key}}}}}"), value)
    })
}

/// A TOML basic string (quoted and escaped).
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// `["a", "b"]`.
fn toml_strings(items: &[String]) -> String {
    let items: Vec<String> = items.iter().map(|s| toml_string(s)).collect();
    format!("[{}]", items.join(", "))
}

/// The source without its `#[cfg(test)] mod tests { ... }`, which the first-party plugins keep
/// last (their tests read the repository's reference files).
fn without_tests(source: &str) -> &str {
    match source.find("\n#[cfg(test)]\nmod tests {") {
        Some(at) => &source[..=at],
        None => source,
    }
}

/// The string items of `table[key]` (an absent key: none).
fn string_list(table: &toml::Table, key: &str) -> Vec<String> {
    table
        .get(key)
        .and_then(toml::Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// `name = <version or inline table>` for a dependency declared `{ workspace = true, ... }` in a
/// first-party plugin: this workspace's version and features, plus the plugin's own features.
fn workspace_dependency(name: &str, spec: &toml::Value) -> anyhow::Result<String> {
    let workspace: toml::Table = WORKSPACE_MANIFEST
        .parse()
        .context("parsing the workspace's Cargo.toml")?;
    let entry = workspace
        .get("workspace")
        .and_then(|w| w.get("dependencies"))
        .and_then(|d| d.get(name))
        .with_context(|| format!("{name} is not in [workspace.dependencies]"))?;
    let (version, default_features, mut features) = match entry {
        toml::Value::String(version) => (version.clone(), true, Vec::new()),
        toml::Value::Table(t) => (
            t.get("version")
                .and_then(toml::Value::as_str)
                .with_context(|| format!("[workspace.dependencies] {name} has no version"))?
                .to_owned(),
            t.get("default-features")
                .and_then(toml::Value::as_bool)
                .unwrap_or(true),
            string_list(t, "features"),
        ),
        _ => bail!("[workspace.dependencies] {name}: unexpected value {entry}"),
    };
    if let Some(own) = spec.as_table() {
        for feature in string_list(own, "features") {
            if !features.contains(&feature) {
                features.push(feature);
            }
        }
    }
    if default_features && features.is_empty() {
        return Ok(format!("{name} = {}", toml_string(&version)));
    }
    let mut fields = vec![format!("version = {}", toml_string(&version))];
    if !default_features {
        fields.push("default-features = false".to_owned());
    }
    if !features.is_empty() {
        fields.push(format!("features = {}", toml_strings(&features)));
    }
    Ok(format!("{name} = {{ {} }}", fields.join(", ")))
}

/// `kiln-sdk = { ..., features = [...] }` (by path or by version).
fn sdk_dependency(by: &str, features: &[String]) -> String {
    if features.is_empty() {
        format!("kiln-sdk = {{ {by} }}")
    } else {
        format!(
            "kiln-sdk = {{ {by}, features = {} }}",
            toml_strings(features)
        )
    }
}

/// The `[dependencies]` lines and the by-version kiln-sdk line of the comment.
fn dependencies(template: &Template, sdk: &Path) -> anyhow::Result<(String, String)> {
    let by_path = format!("path = {}", toml_string(&sdk.to_string_lossy()));
    let by_version = format!("version = {}", toml_string(env!("CARGO_PKG_VERSION")));
    match &template.source {
        Source::Minimal { features, .. } => {
            let features: Vec<String> = features.iter().map(|f| (*f).to_owned()).collect();
            Ok((
                sdk_dependency(&by_path, &features),
                sdk_dependency(&by_version, &features),
            ))
        }
        Source::FirstParty { manifest, .. } => {
            let manifest: toml::Table = manifest
                .parse()
                .with_context(|| format!("parsing the {} plugin's Cargo.toml", template.task))?;
            let deps = manifest
                .get("dependencies")
                .and_then(toml::Value::as_table)
                .with_context(|| format!("the {} plugin has no [dependencies]", template.task))?;
            let sdk_features = deps
                .get("kiln-sdk")
                .and_then(toml::Value::as_table)
                .map(|t| string_list(t, "features"))
                .unwrap_or_default();
            let mut lines = vec![sdk_dependency(&by_path, &sdk_features)];
            for (name, spec) in deps.iter().filter(|(name, _)| *name != "kiln-sdk") {
                lines.push(workspace_dependency(name, spec)?);
            }
            Ok((lines.join("\n"), sdk_dependency(&by_version, &sdk_features)))
        }
    }
}

/// `model_toml` with its `[plugin]` table's `path` set to `plugin`.
fn with_plugin_path(model_toml: &str, plugin: &Path) -> anyhow::Result<String> {
    let mut in_plugin = false;
    let mut replaced = false;
    let mut out = String::with_capacity(model_toml.len() + 128);
    for line in model_toml.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            in_plugin = trimmed.starts_with("[plugin]");
        }
        if in_plugin && !replaced && trimmed.starts_with("path") && trimmed.contains('=') {
            out.push_str(&format!(
                "path = {}   # this crate's build (a relative path is relative to the model folder)",
                toml_string(&plugin.to_string_lossy())
            ));
            replaced = true;
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    if !replaced {
        bail!("the model.toml template has no [plugin] path");
    }
    Ok(out)
}

/// The task's files: `src/*.rs` (name, text).
fn sources(template: &Template) -> Vec<(String, String)> {
    match &template.source {
        Source::Minimal { lib, .. } => vec![("lib.rs".to_owned(), (*lib).to_owned())],
        Source::FirstParty { files, .. } => files
            .iter()
            .map(|(name, text)| {
                let mut text = without_tests(text).to_owned();
                if *name == "lib.rs" {
                    text = format!(
                        "// Written by `kiln plugin new {task}`: the source of Kiln's first-party {task}\n\
                         // plugin (plugins/{task}/src/ in the Kiln repository), its unit tests left out.\n\
                         // Edit freely.\n\n{text}",
                        task = template.task
                    );
                }
                ((*name).to_owned(), text)
            })
            .collect(),
    }
}

/// The task's template; an unknown task is an error that lists the valid ones.
fn template(task: &str) -> anyhow::Result<&'static Template> {
    TEMPLATES
        .iter()
        .find(|t| t.task == task)
        .ok_or_else(|| anyhow::anyhow!("unknown task {task:?}: choose one of {}", TASKS.join(", ")))
}

/// Writes a plugin crate for `task` into `dir` (which must not exist, or be empty), depending on
/// the kiln-sdk at `sdk_path` (default: [`default_sdk_path`]).
pub fn new_plugin(task: &str, dir: &Path, sdk_path: Option<&Path>) -> anyhow::Result<Scaffold> {
    let template = template(task)?;
    if dir.exists() {
        if !dir.is_dir() {
            bail!("{} exists and is not a folder", dir.display());
        }
        let mut entries =
            std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
        if entries.next().is_some() {
            bail!(
                "{} exists and is not empty: choose a new folder (kiln plugin new never \
                 overwrites files)",
                dir.display()
            );
        }
    }
    let sdk = locate_sdk(sdk_path)?;
    let folder_name = std::path::absolute(dir)
        .with_context(|| format!("resolving {}", dir.display()))?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = crate_name(&folder_name);
    let lib = name.replace('-', "_");

    std::fs::create_dir_all(dir.join("src"))
        .with_context(|| format!("creating {}", dir.join("src").display()))?;
    let crate_dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let wasm = crate_dir.join(format!("target/wasm32-wasip2/release/{lib}.wasm"));

    let (dependencies, sdk_by_version) = dependencies(template, &sdk)?;
    let model_toml = with_plugin_path(template.model_toml, &wasm)?;
    let repo = sdk.parent().unwrap_or(&sdk).to_owned();
    let lock = repo.join("Cargo.lock");
    let lock = lock.is_file().then_some(lock);
    let lock_note = if lock.is_some() {
        "\n`Cargo.lock` started as the Kiln repository's, so the build uses the dependency versions \
         Kiln's own\nplugins are tested with (`cargo update` moves them).\n"
    } else {
        ""
    };
    let model_id = format!("demo/{name}");
    let request = render(
        template.request,
        &[("curl", CURL), ("auth", AUTH), ("model_id", &model_id)],
    );
    let origin = match template.source {
        Source::Minimal { .. } => format!(
            "The handler in `src/lib.rs` is a minimal one for\nthe demo model `{}` (Kiln's own \
             `plugins/{}` is the complete one, with every\nconfiguration knob): change it to fit \
             your model.",
            template.model, template.task
        ),
        Source::FirstParty { .. } => format!(
            "`src/` is the source of Kiln's first-party\n{task} plugin (`plugins/{task}/src/` in \
             the Kiln repository, without its unit tests): a minimal\n{task} handler is not small \
             (a decoding loop, a KV cache kept on the host), so this is a\ncomplete one to \
             change. It serves the demo model `{model}`; its configuration keys are\nlisted at \
             the top of `src/lib.rs`.",
            task = template.task,
            model = template.model
        ),
    };
    let crate_dir_text = crate_dir.to_string_lossy();
    let repo_text = repo.to_string_lossy();
    let sdk_text = sdk.to_string_lossy();
    let values: Vec<(&str, &str)> = vec![
        ("name", &name),
        ("task", template.task),
        ("lib", &lib),
        ("origin", &origin),
        ("model", template.model),
        ("model_id", &model_id),
        ("repo", &repo_text),
        ("crate_dir", &crate_dir_text),
        ("model_toml", model_toml.trim_end()),
        ("request", &request),
        ("sdk", &sdk_text),
        ("sdk_by_version", &sdk_by_version),
        ("lock_note", lock_note),
        ("dependencies", &dependencies),
    ];

    let mut files: Vec<(PathBuf, String)> = vec![
        ("Cargo.toml".into(), render(CARGO_TOML, &values)),
        ("README.md".into(), render(README, &values)),
        ("model.toml.example".into(), model_toml.clone()),
        (".gitignore".into(), GITIGNORE.to_owned()),
    ];
    for (file, text) in sources(template) {
        files.push((Path::new("src").join(file), text));
    }
    if let Some(lock) = &lock {
        let text =
            std::fs::read_to_string(lock).with_context(|| format!("reading {}", lock.display()))?;
        files.push(("Cargo.lock".into(), text));
    }
    for (file, text) in &files {
        let path = dir.join(file);
        // create_new: never overwrite a file that appeared since the check above.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(Scaffold {
        name,
        dir: dir.to_owned(),
        files: files.into_iter().map(|(file, _)| file).collect(),
        sdk,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crate_names_are_valid_package_names() {
        assert_eq!(crate_name("custom-plugin"), "custom-plugin");
        assert_eq!(crate_name("My Plugin!"), "my-plugin");
        assert_eq!(crate_name(".tmpAb3x"), "tmpab3x");
        assert_eq!(crate_name("2fast"), "plugin-2fast");
        assert_eq!(crate_name("---"), "plugin");
        assert_eq!(crate_name("test"), "test-plugin");
        assert_eq!(crate_name("fn"), "fn-plugin");
        assert_eq!(crate_name("snake_case"), "snake_case");
        assert_eq!(crate_name("über"), "ber");
    }

    #[test]
    fn every_task_has_a_template_and_an_unknown_one_lists_them() {
        for task in TASKS {
            assert_eq!(template(task).unwrap().task, task);
        }
        let error = template("sentiment").err().unwrap().to_string();
        for task in TASKS {
            assert!(error.contains(task), "{error}");
        }
    }

    #[test]
    fn first_party_sources_lose_only_their_tests() {
        for task in ["asr", "text-generation"] {
            let Source::FirstParty { files, .. } = &template(task).unwrap().source else {
                panic!("{task} is the first-party plugin's source");
            };
            for (name, original) in *files {
                let kept = without_tests(original);
                assert!(kept.len() < original.len(), "{task} {name} has tests");
                assert!(!kept.contains("#[cfg(test)]"), "{task} {name}");
                let tests = &original[kept.len()..];
                assert!(
                    tests.starts_with("#[cfg(test)]\nmod tests {"),
                    "{task} {name}"
                );
                assert!(tests.ends_with("\n}\n"), "{task} {name}: tests are last");
            }
            for (name, text) in sources(template(task).unwrap()) {
                assert!(!text.contains("#[cfg(test)]"), "{task} {name}");
            }
        }
    }

    #[test]
    fn dependencies_come_from_the_workspace() {
        let sdk = Path::new("/repo/sdk");
        let (deps, by_version) = dependencies(template("text-generation").unwrap(), sdk).unwrap();
        assert!(
            deps.starts_with("kiln-sdk = { path = \"/repo/sdk\" }"),
            "{deps}"
        );
        assert!(
            deps.contains("tokenizers = { version = \"0.22\", default-features = false, features = [\"unstable_wasm\"] }"),
            "{deps}"
        );
        assert!(deps.contains("\"loop_controls\", \"json\"]"), "{deps}");
        assert_eq!(by_version, "kiln-sdk = { version = \"0.1.0\" }");
        let (deps, _) = dependencies(template("asr").unwrap(), sdk).unwrap();
        assert!(deps.contains("features = [\"audio\"]"), "{deps}");
        let (deps, _) = dependencies(template("embeddings").unwrap(), sdk).unwrap();
        assert_eq!(
            deps,
            "kiln-sdk = { path = \"/repo/sdk\", features = [\"text\"] }"
        );
    }

    #[test]
    fn model_tomls_point_at_the_build_and_parse() {
        for t in &TEMPLATES {
            let text = with_plugin_path(t.model_toml, Path::new("/x/target/p.wasm")).unwrap();
            let parsed: toml::Table = text.parse().unwrap();
            assert_eq!(parsed["task"].as_str(), Some(t.task));
            assert_eq!(parsed["plugin"]["path"].as_str(), Some("/x/target/p.wasm"));
        }
    }

    #[test]
    fn templates_leave_no_placeholder() {
        let dir = tempfile_dir();
        for task in TASKS {
            let crate_dir = dir.join(task);
            let made = new_plugin(task, &crate_dir, None).unwrap();
            for file in &made.files {
                let text = std::fs::read_to_string(crate_dir.join(file)).unwrap();
                assert!(
                    !text.contains("{{") || file.starts_with("src"),
                    "{task}: {}",
                    file.display()
                );
            }
            let manifest: toml::Table = std::fs::read_to_string(crate_dir.join("Cargo.toml"))
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(manifest["package"]["name"].as_str(), Some(task));
            assert!(manifest["workspace"].as_table().unwrap().is_empty());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-scaffold-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }
}
