// bench_dnnl.cpp - oneDNN 2.6 batch-normalization peer for scripts/bench_compare.sh.
//
// Times oneDNN's CPU batch normalization (training forward with scale and shift,
// then backward with diff_scale/diff_shift) on the same shapes as syncbn-bench,
// float32, in NCHW or NHWC. The thread count is whatever OMP_NUM_THREADS says
// (Debian's libdnnl is built with the OpenMP runtime).
//
// What it deliberately is not: part of the syncbn build. bench_compare.sh compiles
// it with g++ against Debian's libdnnl-dev; the library never depends on oneDNN.
//
// Output, one line per (shape, layout), parsed by bench_compare.sh:
//   RESULT impl=onednn layout=nhwc shape=32,64,56,56 fwd_ms=4.31 fwdbwd_ms=9.80 bwd_ms=5.49
// fwd_ms is the median of the training forward; fwdbwd_ms the median over
// repetitions of (forward + backward) of the same repetition.
//
// Usage: bench_dnnl [--layout nchw|nhwc|both] [--shape N,C,H,W] [--reps R]
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

void fill(memory &m, unsigned seed, float offset) {
    float *p = static_cast<float *>(m.get_data_handle());
    size_t count = m.get_desc().get_size() / sizeof(float);
    std::mt19937 gen(seed);
    std::normal_distribution<float> dist(0.0f, 1.0f);
    for (size_t i = 0; i < count; i++) p[i] = offset + dist(gen);
}

void run(const Shape &s, bool nhwc, int reps, engine &eng, stream &strm) {
    memory::dims dims = {s.n, s.c, s.h, s.w};
    auto tag = nhwc ? memory::format_tag::nhwc : memory::format_tag::nchw;
    memory::desc data_md(dims, memory::data_type::f32, tag);
    memory::desc stat_md({s.c}, memory::data_type::f32, memory::format_tag::x);
    const float eps = 1e-5f;
    auto flags = normalization_flags::use_scale | normalization_flags::use_shift;

    batch_normalization_forward::primitive_desc fwd_pd(
        batch_normalization_forward::desc(prop_kind::forward_training, data_md, eps, flags), eng);
    batch_normalization_backward::primitive_desc bwd_pd(
        batch_normalization_backward::desc(prop_kind::backward, data_md, data_md, eps, flags), eng,
        fwd_pd);

    memory src(data_md, eng), dst(data_md, eng), ddst(data_md, eng), dsrc(data_md, eng);
    memory mean(stat_md, eng), var(stat_md, eng), scale(stat_md, eng), shift(stat_md, eng);
    memory dscale(stat_md, eng), dshift(stat_md, eng);
    fill(src, 1, 1.0f);
    fill(ddst, 2, 0.0f);
    std::fill_n(static_cast<float *>(scale.get_data_handle()), s.c, 1.0f);
    std::fill_n(static_cast<float *>(shift.get_data_handle()), s.c, 0.0f);

    batch_normalization_forward fwd(fwd_pd);
    batch_normalization_backward bwd(bwd_pd);
    std::unordered_map<int, memory> fargs = {{DNNL_ARG_SRC, src},     {DNNL_ARG_DST, dst},
                                             {DNNL_ARG_MEAN, mean},   {DNNL_ARG_VARIANCE, var},
                                             {DNNL_ARG_SCALE, scale}, {DNNL_ARG_SHIFT, shift}};
    std::unordered_map<int, memory> bargs = {
        {DNNL_ARG_SRC, src},           {DNNL_ARG_MEAN, mean},
        {DNNL_ARG_VARIANCE, var},      {DNNL_ARG_DIFF_DST, ddst},
        {DNNL_ARG_SCALE, scale},       {DNNL_ARG_SHIFT, shift}, // 2.6 asks for it in backward too
        {DNNL_ARG_DIFF_SRC, dsrc},
        {DNNL_ARG_DIFF_SCALE, dscale}, {DNNL_ARG_DIFF_SHIFT, dshift}};

    for (int i = 0; i < 3; i++) { // warm-up: page faults, JIT, thread pool
        fwd.execute(strm, fargs);
        bwd.execute(strm, bargs);
        strm.wait();
    }
    std::vector<double> tf, tb, tfb;
    for (int r = 0; r < reps; r++) {
        double t0 = now_ms();
        fwd.execute(strm, fargs);
        strm.wait();
        double t1 = now_ms();
        bwd.execute(strm, bargs);
        strm.wait();
        double t2 = now_ms();
        tf.push_back(t1 - t0);
        tb.push_back(t2 - t1);
        tfb.push_back(t2 - t0);
    }
    std::printf("RESULT impl=onednn layout=%s shape=%ld,%ld,%ld,%ld fwd_ms=%.4f fwdbwd_ms=%.4f "
                "bwd_ms=%.4f impl_name=%s\n",
                nhwc ? "nhwc" : "nchw", s.n, s.c, s.h, s.w, median(tf), median(tfb), median(tb),
                fwd_pd.impl_info_str());
    std::fflush(stdout);
}

} // namespace

int main(int argc, char **argv) {
    std::vector<Shape> shapes = {{32, 64, 56, 56}, {32, 256, 14, 14}, {256, 1024, 1, 1}, {8, 32, 224, 224}};
    std::string layout = "both";
    int reps = 20;
    bool user_shapes = false;
    for (int i = 1; i < argc; i++) {
        if (!std::strcmp(argv[i], "--layout") && i + 1 < argc) {
            layout = argv[++i];
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
            std::fprintf(stderr, "usage: %s [--layout nchw|nhwc|both] [--shape N,C,H,W]... [--reps R]\n",
                         argv[0]);
            return 2;
        }
    }
    try {
        engine eng(engine::kind::cpu, 0);
        stream strm(eng);
        for (const Shape &s : shapes) {
            if (layout == "nchw" || layout == "both") run(s, false, reps, eng, strm);
            if (layout == "nhwc" || layout == "both") run(s, true, reps, eng, strm);
        }
    } catch (const dnnl::error &e) {
        std::fprintf(stderr, "bench_dnnl: oneDNN error %d: %s\n", (int)e.status, e.what());
        return 1;
    }
    return 0;
}
