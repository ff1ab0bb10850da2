// StreamAdder: the transport's receive-and-add (a message added into the destination as its
// fragments arrive, at any byte offsets, in any order); the bf16 wire's pieces likewise.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "worker/comm/bf16_wire.h"
#include "worker/comm/reduce.h"

namespace lmsgd::comm {
namespace {

struct Piece {
  size_t offset, length;
};

// Cuts `bytes` at random byte positions (so floats straddle pieces) and shuffles the pieces.
std::vector<Piece> RandomPieces(size_t bytes, int cuts, std::mt19937* rng) {
  std::vector<size_t> at = {0, bytes};
  std::uniform_int_distribution<size_t> pos(1, bytes > 1 ? bytes - 1 : 1);
  for (int i = 0; i < cuts && bytes > 1; ++i) at.push_back(pos(*rng));
  std::sort(at.begin(), at.end());
  at.erase(std::unique(at.begin(), at.end()), at.end());
  std::vector<Piece> pieces;
  for (size_t i = 0; i + 1 < at.size(); ++i) pieces.push_back({at[i], at[i + 1] - at[i]});
  std::shuffle(pieces.begin(), pieces.end(), *rng);
  return pieces;
}

// Feeds `piece` from a copy at an odd address (fragments in a receive buffer have any alignment).
void Feed(StreamAdder* adder, const std::vector<float>& message, const Piece& piece) {
  std::vector<unsigned char> staging(piece.length + 1);
  std::memcpy(staging.data() + 1, reinterpret_cast<const unsigned char*>(message.data()) + piece.offset,
              piece.length);
  adder->Add(piece.offset, staging.data() + 1, piece.length);
}

TEST(StreamAdderTest, AnyFragmentationInAnyOrderGivesExactlyAddFloatsResult) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> value(-3.0f, 3.0f);
  for (size_t n : {1u, 2u, 7u, 1023u, 2049u, 65537u}) {
    for (int cuts : {0, 1, 5, 40}) {
      std::vector<float> dst(n), message(n);
      for (size_t i = 0; i < n; ++i) {
        dst[i] = value(rng);
        message[i] = value(rng);
      }
      std::vector<float> want = dst;
      AddFloats(want.data(), message.data(), n);
      StreamAdder adder;
      adder.Reset(dst.data(), n * sizeof(float));
      const auto pieces = RandomPieces(n * sizeof(float), cuts, &rng);
      for (size_t p = 0; p < pieces.size(); ++p) {
        EXPECT_EQ(adder.complete(), false) << "n=" << n << " complete before its last piece";
        Feed(&adder, message, pieces[p]);
      }
      EXPECT_TRUE(adder.complete()) << "n=" << n << " cuts=" << cuts;
      EXPECT_EQ(adder.received(), n * sizeof(float));
      ASSERT_EQ(std::memcmp(dst.data(), want.data(), n * sizeof(float)), 0) << "n=" << n << " cuts=" << cuts;
    }
  }
}

// The bf16 wire's receive-and-add: 2-byte values, split anywhere, each widened and added once,
// exactly as AddBf16 adds the whole message; a final one (the last step of a ring's
// reduce-scatter, P2POp::kFinal) also rounds each sum to bf16, as FloatToBf16 rounds it.
TEST(StreamAdderTest, Bf16ValuesInAnyFragmentationAreWidenedAndAddedOnce) {
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> value(-3.0f, 3.0f);
  for (bool round : {false, true}) {
    for (size_t n : {1u, 3u, 1023u, 65537u}) {
      for (int cuts : {0, 1, 7, 40}) {
        std::vector<float> dst(n), want;
        std::vector<uint16_t> message(n);
        for (size_t i = 0; i < n; ++i) {
          dst[i] = value(rng);
          message[i] = FloatToBf16(value(rng));
        }
        want = dst;
        AddBf16(want.data(), message.data(), n);
        if (round) {
          for (float& w : want) w = Bf16ToFloat(FloatToBf16(w));
        }
        StreamAdder adder;
        adder.Reset(dst.data(), n * sizeof(uint16_t), /*bf16=*/true, round);
        const auto* bytes = reinterpret_cast<const unsigned char*>(message.data());
        for (const Piece& p : RandomPieces(n * sizeof(uint16_t), cuts, &rng)) {
          std::vector<unsigned char> odd(p.length + 1);
          std::memcpy(odd.data() + 1, bytes + p.offset, p.length);
          adder.Add(p.offset, odd.data() + 1, p.length);
        }
        const std::string context = absl::StrCat("n=", n, " cuts=", cuts, " round=", round);
        EXPECT_TRUE(adder.complete()) << context;
        ASSERT_EQ(std::memcmp(dst.data(), want.data(), n * sizeof(float)), 0) << context;
      }
    }
  }
}

// The bf16 wire's send and receive (UCX generic datatypes): a message packed and unpacked piece
// by piece, at any byte offsets, in any order, is the whole message's FloatsToBf16 and
// Bf16ToFloats. A send without a hint leaves its values rounded to what it sent; with one, as
// they were; packing a piece twice packs the same bytes.
TEST(Bf16PieceTest, PackAndUnpackInAnyPiecesEqualWholeConversions) {
  std::mt19937 rng(17);
  std::uniform_real_distribution<float> value(-3.0f, 3.0f);
  for (size_t n : {1u, 2u, 3u, 1023u, 65537u}) {
    for (int cuts : {0, 1, 7, 40}) {
      for (bool round : {false, true}) {
        std::vector<float> src(n);
        for (float& v : src) v = value(rng);
        const std::vector<float> original = src;
        std::vector<uint16_t> want(n);
        FloatsToBf16(original.data(), want.data(), n);
        std::vector<unsigned char> wire(2 * n, 0xee);
        const auto pieces = RandomPieces(2 * n, cuts, &rng);
        for (const Piece& p : pieces) {
          std::vector<unsigned char> odd(p.length + 1);
          PackBf16Piece(src.data(), p.offset, odd.data() + 1, p.length, round);
          std::memcpy(wire.data() + p.offset, odd.data() + 1, p.length);
        }
        const std::string context = absl::StrCat("n=", n, " cuts=", cuts, " round=", round);
        ASSERT_EQ(std::memcmp(wire.data(), want.data(), 2 * n), 0) << context;
        for (size_t i = 0; i < n; ++i) {
          ASSERT_EQ(src[i], round ? Bf16ToFloat(want[i]) : original[i]) << context << " i=" << i;
        }
        if (!pieces.empty()) {  // again, from the values as the first packing left them
          const Piece& p = pieces.front();
          std::vector<unsigned char> again(p.length);
          PackBf16Piece(src.data(), p.offset, again.data(), p.length, round);
          ASSERT_EQ(std::memcmp(again.data(), wire.data() + p.offset, p.length), 0) << context;
        }
        std::vector<float> got(n, 123.0f), want_floats(n);
        Bf16ToFloats(want.data(), want_floats.data(), n);
        for (const Piece& p : RandomPieces(2 * n, cuts, &rng)) {
          std::vector<unsigned char> odd(p.length + 1);
          std::memcpy(odd.data() + 1, wire.data() + p.offset, p.length);
          UnpackBf16Piece(odd.data() + 1, p.offset, p.length, got.data());
        }
        ASSERT_EQ(std::memcmp(got.data(), want_floats.data(), n * sizeof(float)), 0) << context;
      }
    }
  }
}

// The shared-memory sum's fused kernels equal the scalar rule (FloatToBf16) value by value
// (the pair's: the rounded sum of the two bf16 values),
// at lengths that leave vector tails, including ties to even, infinities and huge values.
TEST(Bf16KernelTest, RoundedAddedAndNarrowedValuesFollowTheScalarRule) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> value(-3.0f, 3.0f);
  for (size_t n : {1u, 15u, 17u, 2048u, 4099u}) {
    std::vector<float> src(n), acc(n);
    for (size_t i = 0; i < n; ++i) {
      src[i] = value(rng);
      acc[i] = value(rng);
    }
    src[0] = 1.0f + 0x1p-8f;  // a tie: rounds to even (1.0)
    if (n > 3) {
      src[1] = 1.0f + 3 * 0x1p-8f;  // a tie: rounds up to even
      src[2] = std::numeric_limits<float>::infinity();
      src[3] = 3.3e38f;  // near the top of the range
    }
    std::vector<float> rounded(n), added = acc, wide(n, 9.0f), pair = src;
    std::vector<uint16_t> narrow(n, 0xeeee), peer(n), pair16(n, 0xeeee);
    FloatsToBf16(acc.data(), peer.data(), n);
    RoundedFloats(src.data(), rounded.data(), n);
    AddRoundedFloats(added.data(), src.data(), n);
    NarrowAndWiden(src.data(), narrow.data(), wide.data(), n);
    SumPairToBf16(pair.data(), peer.data(), pair16.data(), n);
    for (size_t i = 0; i < n; ++i) {
      const uint16_t h = FloatToBf16(src[i]);
      ASSERT_EQ(narrow[i], h) << "n=" << n << " i=" << i;
      ASSERT_EQ(rounded[i], Bf16ToFloat(h)) << "n=" << n << " i=" << i;
      ASSERT_EQ(wide[i], Bf16ToFloat(h)) << "n=" << n << " i=" << i;
      ASSERT_EQ(added[i], acc[i] + Bf16ToFloat(h)) << "n=" << n << " i=" << i;
      const uint16_t sum = FloatToBf16(Bf16ToFloat(h) + Bf16ToFloat(peer[i]));
      ASSERT_EQ(pair16[i], sum) << "n=" << n << " i=" << i;
      ASSERT_EQ(pair[i], Bf16ToFloat(sum)) << "n=" << n << " i=" << i;
    }
    EXPECT_EQ(rounded[0], 1.0f);
    if (n > 3) {
      EXPECT_EQ(rounded[1], 1.0f + 4 * 0x1p-8f);
    }
  }
}

TEST(StreamAdderTest, AMissingPieceLeavesItIncompleteAndItsFloatsUntouched) {
  std::vector<float> dst(8, 1.0f), message(8, 2.0f);
  StreamAdder adder;
  adder.Reset(dst.data(), 32);
  Feed(&adder, message, {0, 10});   // floats 0, 1 and half of 2
  Feed(&adder, message, {14, 18});  // the rest but bytes 10..13
  EXPECT_FALSE(adder.complete());
  EXPECT_EQ(dst[2], 1.0f);  // its bytes never all arrived: not added
  EXPECT_EQ(dst[3], 1.0f);  // bytes 12, 13 missing
  EXPECT_EQ(dst[0], 3.0f);
  EXPECT_EQ(dst[7], 3.0f);
  Feed(&adder, message, {10, 4});
  EXPECT_TRUE(adder.complete());
  for (float v : dst) EXPECT_EQ(v, 3.0f);
}

TEST(StreamAdderTest, APiecePastTheEndIsRefusedAndMarksTheMessage) {
  std::vector<float> dst(5, 0.0f), message(4, 1.0f);
  StreamAdder adder;
  adder.Reset(dst.data(), 16);
  Feed(&adder, message, {0, 16});
  std::vector<unsigned char> extra(8, 0x3f);
  adder.Add(12, extra.data(), 8);  // bytes 12..19 of a 16-byte message
  EXPECT_TRUE(adder.overflow());
  EXPECT_FALSE(adder.complete());
  EXPECT_EQ(dst[3], 1.0f);
  EXPECT_EQ(dst[4], 0.0f);  // nothing written beyond the destination
}

TEST(StreamAdderTest, PiecesAfterDetachAreDropped) {
  std::vector<float> dst(4, 1.0f), message(4, 5.0f);
  StreamAdder adder;
  adder.Reset(dst.data(), 16);
  Feed(&adder, message, {0, 6});
  adder.Detach();
  Feed(&adder, message, {6, 10});
  EXPECT_EQ(dst[0], 6.0f);
  EXPECT_EQ(dst[1], 1.0f);  // its last two bytes came after Detach
  EXPECT_EQ(dst[3], 1.0f);
}

}  // namespace
}  // namespace lmsgd::comm
