//! The ResNet baseline against PyTorch (`tools/make_resnet_fixtures.py`): evaluation logits
//! with running statistics, the training forward with batch statistics, the loss, every
//! parameter's gradient, the running statistics after a training forward, and parameters,
//! running statistics and logits after three SGD steps — each within 1e-4 (norm-relative).

use std::path::{Path, PathBuf};

use vitrs::checkpoint::safetensors::SafeTensors;
use vitrs::kernels::loss::Targets;
use vitrs::kernels::relative_l2_diff;
use vitrs::model::resnet::{Mode, ResNet, ResNetConfig, ResNetWorkspace};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../../tests/fixtures/resnet/{name}.safetensors"))
}

fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let d = relative_l2_diff(want, got);
    eprintln!("  {what}: {d:e}");
    assert!(
        d <= tol,
        "{what}: {d:e} relative to PyTorch\n  got  {:?}\n  want {:?}",
        &got[..got.len().min(6)],
        &want[..want.len().min(6)]
    );
}

fn check(name: &str, cfg: ResNetConfig) {
    eprintln!("{name}");
    let st = SafeTensors::read(&fixture(name)).unwrap();
    let t = |n: &str| st.tensor(n).unwrap().data().to_vec();
    let mut m = ResNet::zeros(cfg).unwrap();
    // Every PyTorch parameter and running statistic has a place, and nothing is left unset.
    let (np, nb) = (m.params().entries().len(), m.buffers().entries().len());
    let count = |pre: &str| st.tensors().keys().filter(|k| k.starts_with(pre)).count();
    assert_eq!((count("param."), count("buffer.")), (np, nb));
    for e in m.params().entries().to_vec() {
        let v = t(&format!("param.{}", e.name));
        m.params_mut().get_mut(&e.name).unwrap().copy_from_slice(&v);
    }
    for e in m.buffers().entries().to_vec() {
        let v = t(&format!("buffer.{}", e.name));
        m.buffers_mut()
            .get_mut(&e.name)
            .unwrap()
            .copy_from_slice(&v);
    }
    let x = t("x");
    let labels: Vec<usize> = t("labels").iter().map(|&v| v as usize).collect();
    let targets = || Targets::Labels {
        labels: &labels,
        smoothing: 0.0,
    };
    let mut ws = ResNetWorkspace::new();

    m.forward(&x, Mode::Eval, &mut ws).unwrap();
    close("eval logits", ws.logits(), &t("eval.logits"), 1e-4);

    let loss = m.forward_backward(&x, targets(), &mut ws).unwrap();
    close("train logits", ws.logits(), &t("train.logits"), 1e-4);
    close("loss", &[loss], &t("train.loss"), 1e-5);
    for e in m.params().entries() {
        let want = t(&format!("grad.{}", e.name));
        close(
            &format!("grad {}", e.name),
            &ws.grads()[e.range.clone()],
            &want,
            1e-4,
        );
    }
    for e in m.buffers().entries() {
        let want = t(&format!("train.buffer.{}", e.name));
        close(&e.name, &m.buffers().flat()[e.range.clone()], &want, 1e-5);
    }

    // Plain SGD, lr 0.05: the first step on the gradients above, two more.
    for step in 0..3 {
        if step > 0 {
            ws.zero_grads();
            m.forward_backward(&x, targets(), &mut ws).unwrap();
        }
        let g = ws.grads().to_vec();
        m.params_mut()
            .flat_mut()
            .iter_mut()
            .zip(&g)
            .for_each(|(p, g)| *p -= 0.05 * g);
    }
    for e in m.params().entries() {
        let want = t(&format!("steps.param.{}", e.name));
        close(
            &format!("after 3 steps {}", e.name),
            &m.params().flat()[e.range.clone()],
            &want,
            1e-4,
        );
    }
    for e in m.buffers().entries() {
        let want = t(&format!("steps.buffer.{}", e.name));
        close(
            &format!("after 3 steps {}", e.name),
            &m.buffers().flat()[e.range.clone()],
            &want,
            1e-4,
        );
    }
    m.forward(&x, Mode::Eval, &mut ws).unwrap();
    close(
        "eval logits after 3 steps",
        ws.logits(),
        &t("steps.eval.logits"),
        1e-4,
    );
}

#[test]
fn resnet8_on_gray_images_matches_pytorch() {
    check("resnet8_gray", ResNetConfig::cifar(8, 4, 1, (12, 10), 3));
}

#[test]
fn resnet14_on_odd_sized_rgb_images_matches_pytorch() {
    check("resnet14_rgb_odd", ResNetConfig::cifar(14, 6, 3, (9, 9), 5));
}

/// What a PyTorch user has: `save_file(model.state_dict())` of the trained model. Its
/// architecture is read from the shapes, and it evaluates to PyTorch's logits.
#[test]
fn a_pytorch_state_dict_loads_and_gives_pytorchs_logits() {
    let m = ResNet::from_state_dict(&fixture("resnet14_rgb_odd_state_dict"), (9, 9)).unwrap();
    assert_eq!(*m.config(), ResNetConfig::cifar(14, 6, 3, (9, 9), 5));
    let st = SafeTensors::read(&fixture("resnet14_rgb_odd")).unwrap();
    let x = st.tensor("x").unwrap();
    let logits = m.predict(x.data(), &mut ResNetWorkspace::new()).unwrap();
    close(
        "state_dict eval logits",
        &logits,
        st.tensor("steps.eval.logits").unwrap().data(),
        1e-4,
    );
    // Not a ResNet state_dict: the missing tensor is named.
    let e = ResNet::from_state_dict(&fixture("resnet8_gray"), (12, 10)).unwrap_err();
    assert!(e.to_string().contains("conv1.weight"), "{e}");
}
