// The BPE merge loop of reference.py in C++, exposed to Python with pybind11.
// Same algorithm, same tie-break (highest count, then smallest (left, right) pair), same result;
// only the inner loops run as machine code instead of through the Python interpreter.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace py = pybind11;
using Merge = std::tuple<int, int, int>;

static inline uint64_t key(int a, int b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

std::vector<Merge> train_merges(std::vector<std::vector<int>> words, const std::vector<int64_t> &counts,
                                std::vector<std::string> vocab, size_t vocab_size) {
    std::unordered_map<std::string, int> index;
    for (size_t i = 0; i < vocab.size(); ++i) index.emplace(vocab[i], int(i));
    std::vector<Merge> merges;
    std::unordered_map<uint64_t, int64_t> pairs;
    while (index.size() < vocab_size) {
        // 1. count adjacent pairs, weighted by how often each word occurs
        pairs.clear();
        for (size_t w = 0; w < words.size(); ++w)
            for (size_t i = 0; i + 1 < words[w].size(); ++i) pairs[key(words[w][i], words[w][i + 1])] += counts[w];
        if (pairs.empty()) break;
        // 2. the most frequent pair; ties: the smallest (left, right)
        uint64_t best = 0;
        int64_t best_n = -1;
        for (const auto &[k, n] : pairs)
            if (n > best_n || (n == best_n && k < best)) best = k, best_n = n;
        int a = int(best >> 32), b = int(best & 0xffffffffu);
        // 3. the new token (or the existing one with the same string)
        std::string token = vocab[a] + vocab[b];
        auto it = index.find(token);
        int id = it != index.end() ? it->second : int(vocab.size());
        if (it == index.end()) index.emplace(token, id), vocab.push_back(token);
        merges.emplace_back(a, b, id);
        // 4. merge it everywhere, left to right, in place
        for (auto &word : words) {
            size_t out = 0;
            for (size_t i = 0; i < word.size(); ++i, ++out) {
                if (i + 1 < word.size() && word[i] == a && word[i + 1] == b) word[out] = id, ++i;
                else word[out] = word[i];
            }
            word.resize(out);
        }
    }
    return merges;
}

PYBIND11_MODULE(_bpe_merge, m) {
    m.doc() = "BPE merge loop in C++ (see reference.py for the same algorithm in Python)";
    m.def("train_merges", &train_merges, py::arg("words"), py::arg("counts"), py::arg("vocab"),
          py::arg("vocab_size"), "Learn merges; returns [(left id, right id, new id), ...]");
}
