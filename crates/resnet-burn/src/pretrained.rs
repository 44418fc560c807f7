//! torchvision's published ImageNet weights (feature `pretrained`): downloaded once into a
//! cache folder with a progress bar and verified against the hash in their file name, as
//! torchvision verifies them.
//!
//! ```no_run
//! use burn::tensor::Device;
//! use resnet_burn::pretrained::Pretrained;
//!
//! let device = Device::flex();
//! let model = Pretrained::ResNet50ImageNet1kV2.load(&device)?;
//! # Ok::<(), resnet_burn::ImportError>(())
//! ```
//!
//! Offline, [`Pretrained::fetch`] fails with an error that names the URL to download and the
//! path to put the file at; a file already there is verified and used.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use sha2::{Digest, Sha256};

use crate::{ImportError, ResNet, ResNetConfig};

macro_rules! weights {
    ($($variant:ident => $name:literal, $preset:ident, $file:literal, $resize:literal, $top1:literal;)*) => {
        /// A set of torchvision's ImageNet-1k weights for a ResNet preset.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Pretrained {
            $(
                #[doc = concat!("torchvision's `", $name, "` (`", $file, "`), top-1 ", $top1, "%.")]
                $variant,
            )*
        }

        impl Pretrained {
            /// Every published set, in torchvision's order.
            pub const ALL: &'static [Pretrained] = &[$(Pretrained::$variant),*];

            /// torchvision's name, such as `ResNet50_Weights.IMAGENET1K_V2`.
            pub fn name(self) -> &'static str {
                match self { $(Pretrained::$variant => $name,)* }
            }

            /// The file name on torchvision's server; its last 8 hex digits before `.pth`
            /// are the start of the file's SHA-256.
            pub fn file_name(self) -> &'static str {
                match self { $(Pretrained::$variant => $file,)* }
            }

            /// The preset the weights are for (1000 classes, ImageNet stem).
            pub fn config(self) -> ResNetConfig {
                match self { $(Pretrained::$variant => ResNetConfig::$preset(1000),)* }
            }

            /// The preset's name (`resnet50`).
            pub fn preset(self) -> &'static str {
                match self { $(Pretrained::$variant => stringify!($preset),)* }
            }

            /// The resize of torchvision's evaluation transform (shorter side, before the
            /// 224x224 center crop): 256 for the V1 weights, 232 for most V2.
            pub fn resize_size(self) -> usize {
                match self { $(Pretrained::$variant => $resize,)* }
            }

            /// ImageNet-1k top-1 accuracy published by torchvision, in percent.
            pub fn top1(self) -> f64 {
                match self { $(Pretrained::$variant => $top1,)* }
            }
        }
    };
}

weights! {
    ResNet18ImageNet1kV1 => "ResNet18_Weights.IMAGENET1K_V1", resnet18, "resnet18-f37072fd.pth", 256, 69.758;
    ResNet34ImageNet1kV1 => "ResNet34_Weights.IMAGENET1K_V1", resnet34, "resnet34-b627a593.pth", 256, 73.314;
    ResNet50ImageNet1kV1 => "ResNet50_Weights.IMAGENET1K_V1", resnet50, "resnet50-0676ba61.pth", 256, 76.13;
    ResNet50ImageNet1kV2 => "ResNet50_Weights.IMAGENET1K_V2", resnet50, "resnet50-11ad3fa6.pth", 232, 80.858;
    ResNet101ImageNet1kV1 => "ResNet101_Weights.IMAGENET1K_V1", resnet101, "resnet101-63fe2227.pth", 256, 77.374;
    ResNet101ImageNet1kV2 => "ResNet101_Weights.IMAGENET1K_V2", resnet101, "resnet101-cd907fc2.pth", 232, 81.886;
    ResNet152ImageNet1kV1 => "ResNet152_Weights.IMAGENET1K_V1", resnet152, "resnet152-394f9c45.pth", 256, 78.312;
    ResNet152ImageNet1kV2 => "ResNet152_Weights.IMAGENET1K_V2", resnet152, "resnet152-f82ba261.pth", 232, 82.284;
    ResNeXt50_32x4dImageNet1kV1 => "ResNeXt50_32X4D_Weights.IMAGENET1K_V1", resnext50_32x4d, "resnext50_32x4d-7cdf4587.pth", 256, 77.618;
    ResNeXt50_32x4dImageNet1kV2 => "ResNeXt50_32X4D_Weights.IMAGENET1K_V2", resnext50_32x4d, "resnext50_32x4d-1a0047aa.pth", 232, 81.198;
    ResNeXt101_32x8dImageNet1kV1 => "ResNeXt101_32X8D_Weights.IMAGENET1K_V1", resnext101_32x8d, "resnext101_32x8d-8ba56ff5.pth", 256, 79.312;
    ResNeXt101_32x8dImageNet1kV2 => "ResNeXt101_32X8D_Weights.IMAGENET1K_V2", resnext101_32x8d, "resnext101_32x8d-110c445d.pth", 232, 82.834;
    ResNeXt101_64x4dImageNet1kV1 => "ResNeXt101_64X4D_Weights.IMAGENET1K_V1", resnext101_64x4d, "resnext101_64x4d-173b62eb.pth", 232, 83.246;
    WideResNet50_2ImageNet1kV1 => "Wide_ResNet50_2_Weights.IMAGENET1K_V1", wide_resnet50_2, "wide_resnet50_2-95faca4d.pth", 256, 78.468;
    WideResNet50_2ImageNet1kV2 => "Wide_ResNet50_2_Weights.IMAGENET1K_V2", wide_resnet50_2, "wide_resnet50_2-9ba9bcbe.pth", 232, 81.602;
    WideResNet101_2ImageNet1kV1 => "Wide_ResNet101_2_Weights.IMAGENET1K_V1", wide_resnet101_2, "wide_resnet101_2-32ee1156.pth", 256, 78.848;
    WideResNet101_2ImageNet1kV2 => "Wide_ResNet101_2_Weights.IMAGENET1K_V2", wide_resnet101_2, "wide_resnet101_2-d733dc28.pth", 232, 82.51;
}

/// Where torchvision publishes its weights.
pub const BASE_URL: &str = "https://download.pytorch.org/models/";

impl Pretrained {
    /// Finds weights by torchvision's name (`ResNet50_Weights.IMAGENET1K_V2`), by file name
    /// (`resnet50-11ad3fa6.pth`), or by preset (`resnet50`: the best published set, as
    /// torchvision's `DEFAULT`), case-insensitively.
    pub fn from_name(name: &str) -> Option<Self> {
        let wanted = name.to_ascii_lowercase();
        let exact = Self::ALL
            .iter()
            .copied()
            .find(|w| w.name().to_ascii_lowercase() == wanted || w.file_name() == wanted);
        exact.or_else(|| {
            Self::ALL
                .iter()
                .copied()
                .filter(|w| w.preset() == wanted)
                .max_by(|a, b| a.top1().total_cmp(&b.top1()))
        })
    }

    /// The download address.
    pub fn url(self) -> String {
        format!("{BASE_URL}{}", self.file_name())
    }

    /// The start of the file's SHA-256, from its name.
    pub fn hash_prefix(self) -> &'static str {
        let stem = self.file_name().trim_end_matches(".pth");
        &stem[stem.rfind('-').map_or(0, |i| i + 1)..]
    }

    /// The default cache folder, torch hub's (so files torchvision downloaded are reused):
    /// `$TORCH_HOME/hub/checkpoints`, else `~/.cache/torch/hub/checkpoints`. Pass another
    /// folder to [`fetch`](Self::fetch) to keep the files elsewhere.
    pub fn default_dir() -> PathBuf {
        let torch_home = std::env::var_os("TORCH_HOME")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache").join("torch"))
            });
        torch_home
            .unwrap_or_else(std::env::temp_dir)
            .join("hub")
            .join("checkpoints")
    }

    /// The weight file in `dir` (the default cache folder if `None`), downloaded first if
    /// it is not there, and verified either way.
    pub fn fetch(self, dir: Option<&Path>) -> Result<PathBuf, ImportError> {
        let dir = dir.map_or_else(Self::default_dir, Path::to_path_buf);
        self.fetch_from(&self.url(), &dir)
    }

    /// [`fetch`](Self::fetch) from another address (a mirror).
    pub fn fetch_from(self, url: &str, dir: &Path) -> Result<PathBuf, ImportError> {
        let path = dir.join(self.file_name());
        if path.is_file() {
            self.verify(&path)?;
        } else {
            self.download(url, dir, &path)?;
        }
        Ok(path)
    }

    /// Checks that `path` has the SHA-256 its file name promises.
    pub fn verify(self, path: &Path) -> Result<(), ImportError> {
        let bytes = std::fs::read(path).map_err(|source| ImportError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        self.check_digest(path, hex(&Sha256::digest(&bytes)))
    }

    fn check_digest(self, path: &Path, digest: String) -> Result<(), ImportError> {
        if digest.starts_with(self.hash_prefix()) {
            Ok(())
        } else {
            Err(ImportError::Format {
                path: path.to_path_buf(),
                message: format!(
                    "its SHA-256 is {digest}, but {} starts with {}: the file is corrupt or \
                     incomplete; delete it and download {} again",
                    self.name(),
                    self.hash_prefix(),
                    self.url()
                ),
            })
        }
    }

    /// Builds the preset on `device` and loads the weights (fetched into the default cache).
    pub fn load(self, device: &Device) -> Result<ResNet, ImportError> {
        let path = self.fetch(None)?;
        self.config().init(device).load_torchvision(path)
    }
}

impl Pretrained {
    /// Downloads to `<path>.part`, hashing on the way, and renames only a verified file.
    fn download(self, url: &str, dir: &Path, path: &Path) -> Result<(), ImportError> {
        let offline = |message: String| ImportError::Download {
            url: url.to_string(),
            path: path.to_path_buf(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|source| ImportError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let response = ureq::get(url).call().map_err(|e| offline(e.to_string()))?;
        let total = response
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let bar = indicatif::ProgressBar::new(total).with_message(format!("downloading {url}"));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg}\n{wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let part = path.with_extension("pth.part");
        let io = |source| ImportError::Io {
            path: part.clone(),
            source,
        };
        let mut file = std::fs::File::create(&part).map_err(io)?;
        let mut body = response
            .into_body()
            .into_with_config()
            .limit(u64::MAX)
            .reader();
        let mut buffer = vec![0u8; 1 << 16];
        let mut sha = Sha256::new();
        loop {
            let read = body.read(&mut buffer).map_err(|e| offline(e.to_string()))?;
            if read == 0 {
                break;
            }
            sha.update(&buffer[..read]);
            file.write_all(&buffer[..read]).map_err(io)?;
            bar.inc(read as u64);
        }
        file.sync_all().map_err(io)?;
        bar.finish();
        self.check_digest(&part, hex(&sha.finalize()))?;
        std::fs::rename(&part, path).map_err(|source| ImportError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
