// visdet_loss_runner: load a visdet-export loss artifact in C++ (libtorch), run it on inputs written by
// Python, and print the results as JSON.
//
//   visdet_loss_runner info
//   visdet_loss_runner torchscript LOSS.pt CASES.pt [--threads N]
//   visdet_loss_runner pt2 LOSS.pt2 CASES.pt [--threads N] [--model-name NAME]
//
// CASES.pt is written by Python with torch.save (see visdet_export/cpp.py, write_cases):
//
//   {"format": "visdet-cases/1",
//    "cases": [{"name": str, "args": [arg, ...], "grad": bool}, ...]}
//
// For "torchscript", args are the positional arguments of the scripted module's forward: tensors, None,
// strings (reduction_override), numbers (avg_factor as a Python number) or tuples of tensors (the
// QualityFocalLoss (labels, scores) target). With "grad": true, args[0] (pred) is made to require grad and
// the program reports d loss.sum() / d pred from autograd. For "pt2", args are the package's positional
// tensors (for a joint package the outputs are (loss, d loss / d pred)).
//
// Output (stdout), one JSON object:
//   {"runtime": ..., "torch_version": ..., "cases": [{"name": ..., "outputs": [TENSOR, ...], "error": null}]}
//   TENSOR = {"dtype": "float32", "shape": [..], "values": [..]}   (values flattened, row-major)
// For torchscript, outputs are [loss] or [loss, grad]. Exit status: 0 all cases ran, 1 a case failed,
// 2 usage error or the artifact / cases file could not be loaded.

#include <torch/script.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/version.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr const char* kFormat = "visdet-cases/1";

std::string json_string(const std::string& text) {
  std::string out = "\"";
  for (unsigned char c : text) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

std::string json_number(double value) {
  if (std::isnan(value)) return "NaN";  // Python's json module reads NaN / Infinity
  if (std::isinf(value)) return value > 0 ? "Infinity" : "-Infinity";
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.17g", value);  // round-trips float32 and float64 exactly
  return buf;
}

std::string dtype_name(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kBool: return "bool";
    default: return c10::toString(type);
  }
}

std::string json_tensor(const at::Tensor& tensor) {
  std::ostringstream out;
  out << "{\"dtype\": " << json_string(dtype_name(tensor.scalar_type())) << ", \"shape\": [";
  for (size_t i = 0; i < tensor.sizes().size(); ++i) out << (i ? ", " : "") << tensor.sizes()[i];
  out << "], \"values\": [";
  at::Tensor flat = tensor.detach().to(at::kCPU).to(at::kDouble).contiguous().reshape({-1});
  const double* data = flat.data_ptr<double>();
  for (int64_t i = 0; i < flat.numel(); ++i) out << (i ? ", " : "") << json_number(data[i]);
  out << "]}";
  return out.str();
}

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  return std::vector<char>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

struct Case {
  std::string name;
  std::vector<c10::IValue> args;
  bool grad = false;
};

c10::IValue dict_get(const c10::impl::GenericDict& dict, const std::string& key) {
  auto it = dict.find(c10::IValue(key));
  if (it == dict.end()) throw std::runtime_error("cases file: missing key \"" + key + "\"");
  return it->value();
}

std::vector<Case> read_cases(const std::string& path) {
  c10::IValue root = torch::jit::pickle_load(read_file(path));
  if (!root.isGenericDict()) throw std::runtime_error("cases file: the top level must be a dict");
  auto dict = root.toGenericDict();
  c10::IValue format = dict_get(dict, "format");
  if (!format.isString() || format.toStringRef() != kFormat)
    throw std::runtime_error(std::string("cases file: format must be \"") + kFormat + "\"");
  c10::IValue cases = dict_get(dict, "cases");
  if (!cases.isList()) throw std::runtime_error("cases file: \"cases\" must be a list");
  std::vector<Case> out;
  for (const c10::IValue& item : cases.toListRef()) {
    if (!item.isGenericDict()) throw std::runtime_error("cases file: each case must be a dict");
    auto entry = item.toGenericDict();
    Case c;
    c.name = dict_get(entry, "name").toStringRef();
    c10::IValue args = dict_get(entry, "args");
    if (args.isList()) {
      for (const c10::IValue& a : args.toListRef()) c.args.push_back(a);
    } else if (args.isTuple()) {
      for (const c10::IValue& a : args.toTupleRef().elements()) c.args.push_back(a);
    } else {
      throw std::runtime_error("cases file: \"args\" of case " + c.name + " must be a list");
    }
    auto grad = entry.find(c10::IValue(std::string("grad")));
    c.grad = grad != entry.end() && grad->value().isBool() && grad->value().toBool();
    out.push_back(std::move(c));
  }
  return out;
}

std::vector<at::Tensor> outputs_of(const c10::IValue& value) {
  if (value.isTensor()) return {value.toTensor()};
  std::vector<at::Tensor> out;
  if (value.isTuple()) {
    for (const auto& v : value.toTupleRef().elements()) out.push_back(v.toTensor());
  } else if (value.isList()) {
    for (const auto& v : value.toListRef()) out.push_back(v.toTensor());
  } else {
    throw std::runtime_error("the loss returned " + value.tagKind() + ", not a tensor");
  }
  return out;
}

std::vector<at::Tensor> run_torchscript(torch::jit::Module& module, const Case& c) {
  std::vector<c10::IValue> args = c.args;
  at::Tensor pred;
  if (c.grad) {
    if (args.empty() || !args[0].isTensor()) throw std::runtime_error("grad needs a tensor as the first argument");
    pred = args[0].toTensor().detach().clone().set_requires_grad(true);
    args[0] = pred;
  }
  at::Tensor loss = module.forward(args).toTensor();
  if (!c.grad) return {loss.detach()};
  if (!loss.requires_grad()) return {loss.detach(), at::zeros_like(pred)};  // no path from pred to the loss
  loss.sum().backward();
  at::Tensor grad = pred.grad().defined() ? pred.grad() : at::zeros_like(pred);
  return {loss.detach(), grad};
}

std::vector<at::Tensor> run_pt2(torch::inductor::AOTIModelPackageLoader& loader, const Case& c) {
  std::vector<at::Tensor> inputs;
  for (const c10::IValue& a : c.args) {
    if (!a.isTensor()) throw std::runtime_error(".pt2 packages take tensors only; got " + a.tagKind());
    inputs.push_back(a.toTensor().contiguous());  // a package reads its inputs as row-major, whatever their strides
  }
  return loader.run(inputs);
}

int usage() {
  std::cerr << "usage: visdet_loss_runner info\n"
               "       visdet_loss_runner torchscript LOSS.pt CASES.pt [--threads N]\n"
               "       visdet_loss_runner pt2 LOSS.pt2 CASES.pt [--threads N] [--model-name NAME]\n";
  return 2;
}

void print_info() {
  std::cout << "{\"torch_version\": " << json_string(TORCH_VERSION)
            << ", \"cxx11_abi\": " << _GLIBCXX_USE_CXX11_ABI << ", \"cplusplus\": " << __cplusplus
#if defined(__clang__)
            << ", \"compiler\": " << json_string(std::string("clang ") + __clang_version__)
#elif defined(__GNUC__)
            << ", \"compiler\": " << json_string(std::string("gcc ") + __VERSION__)
#endif
            << ", \"threads\": " << at::get_num_threads() << "}" << std::endl;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> positional;
  std::string model_name = "model";
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--threads" && i + 1 < argc) {
      at::set_num_threads(std::stoi(argv[++i]));
    } else if (arg == "--model-name" && i + 1 < argc) {
      model_name = argv[++i];
    } else if (arg == "-h" || arg == "--help") {
      return usage();
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() == 1 && positional[0] == "info") {
    print_info();
    return 0;
  }
  if (positional.size() != 3 || (positional[0] != "torchscript" && positional[0] != "pt2")) return usage();
  const std::string& runtime = positional[0];

  std::vector<Case> cases;
  torch::jit::Module module;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  try {
    cases = read_cases(positional[2]);
    if (runtime == "torchscript") {
      module = torch::jit::load(positional[1]);
      module.eval();
    } else {
      loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(positional[1], model_name);
    }
  } catch (const std::exception& e) {
    std::cout << "{\"runtime\": " << json_string(runtime) << ", \"error\": " << json_string(e.what()) << "}"
              << std::endl;
    return 2;
  }

  int status = 0;
  std::cout << "{\"runtime\": " << json_string(runtime) << ", \"torch_version\": " << json_string(TORCH_VERSION)
            << ", \"error\": null, \"cases\": [";
  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    std::cout << (i ? ",\n  " : "\n  ") << "{\"name\": " << json_string(c.name) << ", ";
    try {
      std::vector<at::Tensor> outputs = runtime == "torchscript" ? run_torchscript(module, c) : run_pt2(*loader, c);
      std::cout << "\"outputs\": [";
      for (size_t k = 0; k < outputs.size(); ++k) std::cout << (k ? ", " : "") << json_tensor(outputs[k]);
      std::cout << "], \"error\": null}";
    } catch (const std::exception& e) {
      status = 1;
      std::cout << "\"outputs\": [], \"error\": " << json_string(e.what()) << "}";
    }
  }
  std::cout << "\n]}" << std::endl;
  return status;
}
