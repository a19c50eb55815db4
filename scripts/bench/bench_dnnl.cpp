// bench_dnnl.cpp - oneDNN 2.6 batch-normalization peer for scripts/bench/bench_compare.sh.
//
// Times oneDNN's CPU batch normalization (training forward with scale and shift,
// then backward with diff_scale/diff_shift) on the same shapes as syncbn-bench, in
// NCHW or NHWC, float32 or bfloat16 (--dtype; scale, shift, statistics and their
// gradients stay f32, as in syncbn), alone or with the activations of syncbn's
// --act modes (--act), composed the way a oneDNN user would:
//   none      BN.
//   relu      BN with normalization_flags::fuse_norm_relu: ONE primitive each way,
//             the ReLU mask kept in oneDNN's workspace (1 bit per element in the jit
//             kernels). The peer of syncbn's fused relu.
//   add-relu  y = relu(BN(x) + z), the function syncbn's add-relu computes: BN, then
//             a binary add with an eltwise ReLU post-op (one pass); backward: eltwise
//             ReLU backward from y (relu_use_dst_for_bwd) gives g, which IS dz (the
//             add's backward is the identity, nothing copied), then BN backward of g.
//             oneDNN 2.6 has no fused BN+add+ReLU (dnnl_fuse_norm_add_relu came with
//             oneDNN 3.x), so this is the best composition 2.6 offers.
//   relu-add  y = relu(BN(x)) + z ("BN+ReLU followed by a separate binary add",
//             the other order): fused BN+ReLU, then a binary add; backward: fused BN+ReLU
//             backward of dy (dz = dy, nothing to do). NOT the same function as
//             add-relu (the ReLU comes before the addition), and cheaper: listed
//             to show what the fused primitive plus one add costs.
// The thread count is whatever OMP_NUM_THREADS says (Debian's libdnnl is built with
// the OpenMP runtime).
//
// What it deliberately is not: part of the syncbn build. bench_compare.sh compiles
// it with g++ against Debian's libdnnl-dev; the library never depends on oneDNN.
//
// Output, one line per (shape, layout, act, dtype), parsed by bench_compare.sh:
//   RESULT impl=onednn layout=nhwc shape=32,64,56,56 fwd_ms=4.31 fwdbwd_ms=9.80 bwd_ms=5.49
//          act=none dtype=f32 impl_name=bnorm_jit:avx512_core   (one line)
// fwd_ms is the median of the training forward (all its primitives); fwdbwd_ms the
// median over repetitions of (forward + backward) of the same repetition. impl_name
// is oneDNN's implementation of the BN forward (a "ref:" name means oneDNN fell back
// to its slow reference code, e.g. bf16 on a CPU without AVX-512).
// A combination oneDNN cannot create prints "UNSUPPORTED ..." and no RESULT.
//
// Usage: bench_dnnl [--layout nchw|nhwc|both] [--shape N,C,H,W]... [--reps R]
//                   [--act LIST] [--dtype LIST]
//   --act LIST:   comma-separated none,relu,add-relu,relu-add (default none)
//   --dtype LIST: comma-separated f32,bf16 (default f32)
#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

using namespace dnnl;

namespace {

struct Shape {
    long n, c, h, w;
};

double now_ms() {
    using clk = std::chrono::steady_clock;
    return std::chrono::duration<double, std::milli>(clk::now().time_since_epoch()).count();
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    size_t m = v.size() / 2;
    return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

uint16_t to_bf16(float f) { // round to nearest even; the values here are finite
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

void fill(memory &m, unsigned seed, float offset) {
    const bool bf16 = m.get_desc().data_type() == memory::data_type::bf16;
    size_t count = m.get_desc().get_size() / (bf16 ? 2 : 4);
    std::mt19937 gen(seed);
    std::normal_distribution<float> dist(0.0f, 1.0f);
    if (bf16) {
        uint16_t *p = static_cast<uint16_t *>(m.get_data_handle());
        for (size_t i = 0; i < count; i++) p[i] = to_bf16(offset + dist(gen));
    } else {
        float *p = static_cast<float *>(m.get_data_handle());
        for (size_t i = 0; i < count; i++) p[i] = offset + dist(gen);
    }
}

using args_t = std::unordered_map<int, memory>;
struct step {
    primitive p;
    args_t args;
};

void run(const Shape &s, bool nhwc, const std::string &act, bool bf16, int reps, engine &eng, stream &strm) {
    memory::dims dims = {s.n, s.c, s.h, s.w};
    auto tag = nhwc ? memory::format_tag::nhwc : memory::format_tag::nchw;
    auto dt = bf16 ? memory::data_type::bf16 : memory::data_type::f32;
    memory::desc data_md(dims, dt, tag);
    memory::desc stat_md({s.c}, memory::data_type::f32, memory::format_tag::x);
    const float eps = 1e-5f;
    const bool fused_relu = act == "relu" || act == "relu-add";
    const bool add = act == "add-relu" || act == "relu-add";
    auto flags = normalization_flags::use_scale | normalization_flags::use_shift;
    if (fused_relu) flags = flags | normalization_flags::fuse_norm_relu;

    batch_normalization_forward::primitive_desc fwd_pd(
        batch_normalization_forward::desc(prop_kind::forward_training, data_md, eps, flags), eng);
    batch_normalization_backward::primitive_desc bwd_pd(
        batch_normalization_backward::desc(prop_kind::backward, data_md, data_md, eps, flags), eng,
        fwd_pd);

    // x, dy inputs; t = BN(x) (add modes), z, y; g = relu'(y)*dy (= dz, add-relu); dx.
    memory src(data_md, eng), dst(data_md, eng), ddst(data_md, eng), dsrc(data_md, eng);
    memory mean(stat_md, eng), var(stat_md, eng), scale(stat_md, eng), shift(stat_md, eng);
    memory dscale(stat_md, eng), dshift(stat_md, eng);
    fill(src, 1, 1.0f);
    fill(ddst, 2, 0.0f);
    std::fill_n(static_cast<float *>(scale.get_data_handle()), s.c, 1.0f);
    std::fill_n(static_cast<float *>(shift.get_data_handle()), s.c, 0.0f);

    std::vector<step> fsteps, bsteps;
    args_t fargs = {{DNNL_ARG_SRC, src},   {DNNL_ARG_MEAN, mean},   {DNNL_ARG_VARIANCE, var},
                    {DNNL_ARG_SCALE, scale}, {DNNL_ARG_SHIFT, shift}};
    args_t bargs = {{DNNL_ARG_SRC, src},           {DNNL_ARG_MEAN, mean},
                    {DNNL_ARG_VARIANCE, var},      {DNNL_ARG_SCALE, scale},
                    {DNNL_ARG_SHIFT, shift}, // 2.6 asks for it in backward too
                    {DNNL_ARG_DIFF_SRC, dsrc},     {DNNL_ARG_DIFF_SCALE, dscale},
                    {DNNL_ARG_DIFF_SHIFT, dshift}};
    if (fused_relu) {
        memory ws(fwd_pd.workspace_desc(), eng);
        fargs.insert({DNNL_ARG_WORKSPACE, ws});
        bargs.insert({DNNL_ARG_WORKSPACE, ws});
    }
    if (!add) {
        fargs.insert({DNNL_ARG_DST, dst});
        bargs.insert({DNNL_ARG_DIFF_DST, ddst});
        fsteps.push_back({batch_normalization_forward(fwd_pd), fargs});
        bsteps.push_back({batch_normalization_backward(bwd_pd), bargs});
    } else {
        memory t(data_md, eng), z(data_md, eng);
        fill(z, 3, 0.0f);
        fargs.insert({DNNL_ARG_DST, t});
        fsteps.push_back({batch_normalization_forward(fwd_pd), fargs});
        primitive_attr attr;
        if (act == "add-relu") {
            post_ops po;
            po.append_eltwise(1.0f, algorithm::eltwise_relu, 0.0f, 0.0f);
            attr.set_post_ops(po);
        }
        binary::primitive_desc add_pd(binary::desc(algorithm::binary_add, data_md, data_md, data_md), attr, eng);
        fsteps.push_back({binary(add_pd), {{DNNL_ARG_SRC_0, t}, {DNNL_ARG_SRC_1, z}, {DNNL_ARG_DST, dst}}});
        if (act == "add-relu") {
            memory g(data_md, eng); // dz = g: the add's backward passes g on unchanged
            auto efwd_pd = eltwise_forward::primitive_desc(
                eltwise_forward::desc(prop_kind::forward_training, algorithm::eltwise_relu_use_dst_for_bwd,
                                      data_md, 0.0f, 0.0f),
                eng);
            eltwise_backward::primitive_desc ebwd_pd(
                eltwise_backward::desc(algorithm::eltwise_relu_use_dst_for_bwd, data_md, data_md, 0.0f, 0.0f), eng,
                efwd_pd);
            bsteps.push_back(
                {eltwise_backward(ebwd_pd), {{DNNL_ARG_DST, dst}, {DNNL_ARG_DIFF_DST, ddst}, {DNNL_ARG_DIFF_SRC, g}}});
            bargs.insert({DNNL_ARG_DIFF_DST, g});
        } else {
            bargs.insert({DNNL_ARG_DIFF_DST, ddst}); // relu-add: dz = dy and d(relu(BN)) = dy
        }
        bsteps.push_back({batch_normalization_backward(bwd_pd), bargs});
    }

    auto exec = [&](std::vector<step> &steps) {
        for (auto &st : steps) st.p.execute(strm, st.args);
        strm.wait();
    };
    for (int i = 0; i < 3; i++) { // warm-up: page faults, JIT, thread pool
        exec(fsteps);
        exec(bsteps);
    }
    std::vector<double> tf, tb, tfb;
    for (int r = 0; r < reps; r++) {
        double t0 = now_ms();
        exec(fsteps);
        double t1 = now_ms();
        exec(bsteps);
        double t2 = now_ms();
        tf.push_back(t1 - t0);
        tb.push_back(t2 - t1);
        tfb.push_back(t2 - t0);
    }
    std::printf("RESULT impl=onednn layout=%s shape=%ld,%ld,%ld,%ld fwd_ms=%.4f fwdbwd_ms=%.4f "
                "bwd_ms=%.4f act=%s dtype=%s impl_name=%s\n",
                nhwc ? "nhwc" : "nchw", s.n, s.c, s.h, s.w, median(tf), median(tfb), median(tb), act.c_str(),
                bf16 ? "bf16" : "f32", fwd_pd.impl_info_str());
    std::fflush(stdout);
}

std::vector<std::string> split_list(const std::string &v) {
    std::vector<std::string> out;
    size_t a = 0;
    while (a <= v.size()) {
        size_t b = v.find(',', a);
        if (b == std::string::npos) b = v.size();
        if (b > a) out.push_back(v.substr(a, b - a));
        a = b + 1;
    }
    return out;
}

} // namespace

int main(int argc, char **argv) {
    std::vector<Shape> shapes = {{32, 64, 56, 56}, {32, 256, 14, 14}, {256, 1024, 1, 1}, {8, 32, 224, 224}};
    std::string layout = "both";
    std::vector<std::string> acts = {"none"}, dtypes = {"f32"};
    int reps = 20;
    bool user_shapes = false;
    for (int i = 1; i < argc; i++) {
        if (!std::strcmp(argv[i], "--layout") && i + 1 < argc) {
            layout = argv[++i];
        } else if (!std::strcmp(argv[i], "--act") && i + 1 < argc) {
            acts = split_list(argv[++i]);
        } else if (!std::strcmp(argv[i], "--dtype") && i + 1 < argc) {
            dtypes = split_list(argv[++i]);
        } else if (!std::strcmp(argv[i], "--reps") && i + 1 < argc) {
            reps = std::max(1, std::atoi(argv[++i]));
        } else if (!std::strcmp(argv[i], "--shape") && i + 1 < argc) {
            Shape s;
            if (std::sscanf(argv[++i], "%ld,%ld,%ld,%ld", &s.n, &s.c, &s.h, &s.w) != 4) {
                std::fprintf(stderr, "bad --shape %s (want N,C,H,W)\n", argv[i]);
                return 2;
            }
            if (!user_shapes) shapes.clear();
            user_shapes = true;
            shapes.push_back(s);
        } else {
            std::fprintf(stderr, "usage: %s [--layout nchw|nhwc|both] [--shape N,C,H,W]... [--reps R] "
                         "[--act none,relu,add-relu,relu-add] [--dtype f32,bf16]\n",
                         argv[0]);
            return 2;
        }
    }
    try {
        engine eng(engine::kind::cpu, 0);
        stream strm(eng);
        for (const std::string &a : acts)
            if (a != "none" && a != "relu" && a != "add-relu" && a != "relu-add") {
                std::fprintf(stderr, "bench_dnnl: unknown --act %s\n", a.c_str());
                return 2;
            }
        for (const std::string &d : dtypes)
            if (d != "f32" && d != "bf16") {
                std::fprintf(stderr, "bench_dnnl: unknown --dtype %s\n", d.c_str());
                return 2;
            }
        for (const Shape &s : shapes)
            for (int l = 0; l < 2; l++) {
                if (layout != "both" && layout != (l ? "nhwc" : "nchw")) continue;
                for (const std::string &d : dtypes)
                    for (const std::string &a : acts) {
                        try {
                            run(s, l == 1, a, d == "bf16", reps, eng, strm);
                        } catch (const dnnl::error &e) { // e.g. bf16 where oneDNN has no kernel
                            std::printf("UNSUPPORTED impl=onednn layout=%s shape=%ld,%ld,%ld,%ld act=%s dtype=%s "
                                        "status=%d what=\"%s\"\n",
                                        l ? "nhwc" : "nchw", s.n, s.c, s.h, s.w, a.c_str(), d.c_str(),
                                        (int)e.status, e.what());
                            std::fflush(stdout);
                        }
                    }
            }
    } catch (const dnnl::error &e) {
        std::fprintf(stderr, "bench_dnnl: oneDNN error %d: %s\n", (int)e.status, e.what());
        return 1;
    }
    return 0;
}
