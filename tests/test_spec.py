import onnx
import pytest
from onnx import TensorProto, helper

from centernet_edge.runtime.spec import (
    COCO_CATEGORY_IDS,
    COCO_CLASS_NAMES,
    OFFICIAL_DEMO_MEAN_BGR,
    OFFICIAL_DEMO_STD_BGR,
    OFFICIAL_MEAN_BGR,
    OFFICIAL_STD_BGR,
    GraphIO,
    ModelSpec,
    SpecError,
    TensorInfo,
    mmdet_preprocess,
    official_preprocess,
    source_decode,
)


def _spec() -> ModelSpec:
    return ModelSpec(
        name="t", source="official", arch="res_18", num_classes=80, class_names=list(COCO_CLASS_NAMES),
        preprocess=official_preprocess(), decode=source_decode("official"),
        graph=GraphIO(outputs={"detections": TensorInfo("detections", "float32", ["N", 100, 6])}),
        category_ids=list(COCO_CATEGORY_IDS),
    ).validate()


def test_coco_tables_are_consistent():
    assert len(COCO_CATEGORY_IDS) == len(COCO_CLASS_NAMES) == 80
    assert COCO_CATEGORY_IDS[0] == 1 and COCO_CATEGORY_IDS[-1] == 90 and 12 not in COCO_CATEGORY_IDS


def test_json_round_trip_is_lossless():
    spec = _spec()
    again = ModelSpec.from_json(spec.to_json())
    assert again == spec
    assert again.preprocess.mean == pytest.approx((0.40789654, 0.44719302, 0.47026115))


def test_onnx_metadata_round_trip():
    node = helper.make_node("Identity", ["x"], ["detections"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("detections", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph)
    spec = _spec()
    spec.write_to_onnx(model)
    spec.write_to_onnx(model)  # rewriting replaces, never duplicates
    assert sum(p.key == "centernet_edge.model_spec" for p in model.metadata_props) == 1
    assert ModelSpec.from_onnx(onnx.load_from_string(model.SerializeToString())) == spec


def test_missing_metadata_names_the_fix():
    model = helper.make_model(helper.make_graph([], "g", [], []))
    with pytest.raises(SpecError, match="model description"):
        ModelSpec.from_onnx(model)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(num_classes=3), "class_names has 80 entries"),
        (lambda d: d["preprocess"].update(resize="letterbox"), "preprocess.resize"),
        (lambda d: d["decode"].update(K=5000), "TensorRT TopK limit"),
        (lambda d: d["preprocess"].update(resize="keep_res", input_size=None, pad=30), "2\\*\\*k - 1"),
        (lambda d: d.update(colour="BGR"), "unknown model-spec fields: colour"),
        (lambda d: d.pop("num_classes"), "missing required field 'num_classes'"),
        (lambda d: d.update(format_version=99), "newer than this toolkit"),
        (lambda d: d["preprocess"].update(normalization="imagenet"), "preprocess.normalization must be one of"),
        (lambda d: d["preprocess"].update(normalization="official_demo"), "but mean/std are"),
    ],
)
def test_invalid_specs_are_refused_with_a_reason(mutate, message):
    data = _spec().to_dict()
    mutate(data)
    with pytest.raises(SpecError, match=message):
        ModelSpec.from_dict(data)


def test_two_official_normalisations_test_is_the_default():
    default, demo = official_preprocess(), official_preprocess(normalization="demo")
    assert default.normalization == "official_test" and default.mean == OFFICIAL_MEAN_BGR
    assert default.std == OFFICIAL_STD_BGR == (0.28863828, 0.27408164, 0.27809835)
    assert demo.normalization == "official_demo"
    assert demo.mean == OFFICIAL_DEMO_MEAN_BGR == (0.408, 0.447, 0.470)
    assert demo.std == OFFICIAL_DEMO_STD_BGR == (0.289, 0.274, 0.278)
    assert mmdet_preprocess().normalization == "mmdet"
    with pytest.raises(SpecError, match="official normalization must be one of test, demo"):
        official_preprocess(normalization="imagenet")


def test_specs_without_a_normalization_name_still_load():
    data = _spec().to_dict()
    del data["preprocess"]["normalization"]  # written before the field existed
    spec = ModelSpec.from_dict(data)
    assert spec.preprocess.normalization is None and spec.preprocess.mean == OFFICIAL_MEAN_BGR
    data["preprocess"]["mean"] = [0.5, 0.5, 0.5]  # foreign values stated by value only are fine
    assert ModelSpec.from_dict(data).preprocess.mean == (0.5, 0.5, 0.5)
